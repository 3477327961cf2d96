"""Which package, and so which project version, a shared object comes from.

For ``check``: libp11's engine and the OpenSSL providers do not report their
own project's version at run time (measured: pkcs11-provider 1.0 answers
OSSL_PROVIDER_get_params "version" with the OpenSSL version it was built
against, 3.0.16 on Debian 12 and 3.5.0 on Debian 13; libp11's engine says
only "pkcs11 engine").  Two sources know it:

- the ELF package metadata note (``.note.package``, owner ``FDO``, type
  0xcafe1a7e, a JSON object with ``name`` and ``version``) that Debian and
  Fedora builds carry (Debian's pkcs11-provider has one; its libp11 engine,
  on Debian 12 and 13, has none);
- the package system: ``dpkg-query -S`` for the file, then its version.

Read-only and best effort: nothing found is ``None``, never an error.
"""

from __future__ import annotations

import json
import os
import struct

from ._record import dataclass

__all__ = ["Package", "elf_package_note", "package_of", "upstream_version"]

_NOTE_OWNER = b"FDO\0"
_NOTE_TYPE = 0xCAFE1A7E
_MAX_ELF = 64 * 1024 * 1024  # read no more of a file than a shared object of that size


@dataclass(frozen=True)
class Package:
    name: str  # the distribution's package name (pkcs11-provider, libengine-pkcs11-openssl)
    version: str  # as the distribution has it (1.0-3~bpo12+1)
    upstream: str  # the project's own version (1.0)
    source: str  # where it was read: "elf-note" or "dpkg"

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "upstream": self.upstream, "source": self.source}


def upstream_version(version: str) -> str:
    """The project's version inside a distribution's version: no epoch
    (``1:``), no packaging revision (``-3~bpo12+1``, ``-1.fc40``)."""
    v = version.split(":", 1)[1] if ":" in version.split("-", 1)[0] else version
    return v.rsplit("-", 1)[0] if "-" in v else v


def elf_package_note(path: str) -> dict[str, str] | None:
    """The JSON of a 64- or 32-bit little-endian ELF file's package
    metadata note, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_ELF)
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[5:6] != b"\x01":  # little-endian only (x86, arm, riscv)
        return None
    wide = data[4:5] == b"\x02"
    try:
        if wide:
            (shoff,) = struct.unpack_from("<Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
            fmt = "<IIQQQQIIQQ"  # name type flags addr offset size link info addralign entsize
        else:
            (shoff,) = struct.unpack_from("<I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
            fmt = "<IIIIIIIIII"
        sections = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
        names = sections[shstrndx]
        for sec in sections:
            start = names[4] + sec[0]
            name = data[start : data.index(b"\0", start)]
            if name == b".note.package" and sec[1] == 7:  # SHT_NOTE
                return _parse_notes(data[sec[4] : sec[4] + sec[5]])
    except (struct.error, IndexError, ValueError):
        return None
    return None


def elf_dynamic(path: str) -> dict[str, list[str]] | None:
    """The DT_NEEDED and DT_SONAME names of a 64- or 32-bit little-endian
    ELF shared object (``{"needed": [...], "soname": [...]}``), or None when
    it cannot be read as one."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_ELF)
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[5:6] != b"\x01":
        return None
    wide = data[4:5] == b"\x02"
    try:
        if wide:
            (shoff,) = struct.unpack_from("<Q", data, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
            fmt, entry = "<IIQQQQIIQQ", "<qQ"
        else:
            (shoff,) = struct.unpack_from("<I", data, 0x20)
            shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
            fmt, entry = "<IIIIIIIIII", "<iI"
        sections = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
        for sec in sections:
            if sec[1] != 6:  # SHT_DYNAMIC; its sh_link is the string table
                continue
            strtab = sections[sec[6]][4]
            found: dict[str, list[str]] = {"needed": [], "soname": []}
            size = struct.calcsize(entry)
            for pos in range(sec[4], sec[4] + sec[5], size):
                tag, value = struct.unpack_from(entry, data, pos)
                if tag == 0:  # DT_NULL
                    break
                if tag in (1, 14):  # DT_NEEDED, DT_SONAME
                    start = strtab + value
                    name = data[start : data.index(b"\0", start)].decode("utf-8", "replace")
                    found["needed" if tag == 1 else "soname"].append(name)
            return found
    except (struct.error, IndexError, ValueError):
        return None
    return {"needed": [], "soname": []}


def _parse_notes(notes: bytes) -> dict[str, str] | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        pos += 12
        name = notes[pos : pos + namesz]
        pos += (namesz + 3) & ~3
        desc = notes[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        if name == _NOTE_OWNER and ntype == _NOTE_TYPE:
            try:
                doc = json.loads(desc.rstrip(b"\0").decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return None
            if isinstance(doc, dict) and isinstance(doc.get("name"), str) and isinstance(doc.get("version"), str):
                return {str(k): str(v) for k, v in doc.items()}
            return None
    return None


def _dpkg(*args: str) -> str | None:
    # Imported here: the backends read ELF notes on every key load, never dpkg.
    import shutil
    import subprocess

    tool = shutil.which("dpkg-query")
    if tool is None:
        return None
    try:
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _dpkg_package(path: str) -> Package | None:
    for candidate in dict.fromkeys((path, os.path.realpath(path))):
        owner = _dpkg("-S", candidate)
        if not owner:
            continue
        name = owner.splitlines()[0].split(": ", 1)[0].split(", ")[0]
        version = _dpkg("-W", "-f=${Version}", name)
        if version:
            return Package(name.split(":", 1)[0], version, upstream_version(version), "dpkg")
    return None


def package_of(path: str) -> Package | None:
    """The package that installed ``path``: from its ELF note, else dpkg."""
    note = elf_package_note(path)
    if note is not None:
        return Package(note["name"], note["version"], upstream_version(note["version"]), "elf-note")
    return _dpkg_package(path)
