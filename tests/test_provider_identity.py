"""Which PKCS#11 provider the provider backend would load, and which
packages the backends come from (what ``check``'s backends step reports).

The real pkcs11-provider and libp11 engine installed here are asked
directly.  libp11's own provider (``pkcs11prov.so``, libp11 0.4.14 and later)
cannot be installed on Debian 12 or 13 (libp11 0.4.12 / 0.4.13 there), so its
detection is tested with stand-in providers compiled here: real OpenSSL
providers (OpenSSL loads them and asks them for their parameters) that
answer ``OSSL_PROVIDER_get_params`` the way libp11's provider does (its
name is the name it was loaded under, its version the core's OpenSSL
version, its build info the OpenSSL it was compiled with), some with an ELF
package metadata note.  They do nothing else: no key is ever loaded from
them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

import mtls_engine
from mtls_engine import _backends
from mtls_engine._check import _number_version_text
from mtls_engine._lib import lib
from mtls_engine._packages import elf_dynamic, elf_package_note, package_of, upstream_version

from .conftest import Pki, engine_api, need, need_backend
from .helpers import ROOT

# Answers as libp11's provider.c does: name = the name the core loaded it
# under, version = the core's OpenSSL version, buildinfo = the OpenSSL it was
# compiled with.  NOTE_JSON (optional) becomes an ELF package metadata note.
_STAND_IN = r"""
#include <string.h>
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/opensslv.h>
#include <openssl/params.h>

#ifdef NOTE_JSON
struct note { unsigned int namesz, descsz, type; char name[4]; char desc[(sizeof(NOTE_JSON) + 3) & ~3]; };
__attribute__((section(".note.package"), aligned(4), used))
static const struct note package_note = {4, sizeof(NOTE_JSON), 0xcafe1a7e, "FDO", NOTE_JSON};
#endif

static const char *loaded_as = "", *core_version = "";

static int get_params(void *ctx, OSSL_PARAM params[])
{
    OSSL_PARAM *p;
    (void)ctx;
#ifdef FIXED_NAME
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME)) && !OSSL_PARAM_set_utf8_ptr(p, FIXED_NAME))
        return 0;
#else
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME)) && !OSSL_PARAM_set_utf8_ptr(p, loaded_as))
        return 0;
#endif
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION)) && !OSSL_PARAM_set_utf8_ptr(p, core_version))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO))
        && !OSSL_PARAM_set_utf8_ptr(p, OPENSSL_FULL_VERSION_STR))
        return 0;
    return 1;
}

static void teardown(void *ctx) { (void)ctx; }

static const OSSL_DISPATCH functions[] = {
    {OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))get_params},
    {OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))teardown},
    {0, NULL}};

int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in, const OSSL_DISPATCH **out,
                       void **ctx)
{
    OSSL_FUNC_core_get_params_fn *core_get_params = NULL;
    OSSL_PARAM core[3];
    for (; in->function_id != 0; in++)
        if (in->function_id == OSSL_FUNC_CORE_GET_PARAMS)
            core_get_params = OSSL_FUNC_core_get_params(in);
    core[0] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_CORE_PROV_NAME, (char **)&loaded_as, 0);
    core[1] = OSSL_PARAM_construct_utf8_ptr(OSSL_PROV_PARAM_CORE_VERSION, (char **)&core_version, 0);
    core[2] = OSSL_PARAM_construct_end();
    if (core_get_params == NULL || !core_get_params(handle, core))
        return 0;
    *out = functions;
    *ctx = (void *)functions;
    return 1;
}
"""


def _build(folder: Path, name: str, *defines: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    need(cc is not None, "a C compiler (Debian: gcc) builds the stand-in providers")
    assert cc is not None
    src = folder / f"{name}.c"
    src.write_text(_STAND_IN)
    out = folder / name
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src), *defines, "-lcrypto"], check=True)
    return str(out)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("stand-in-providers")
    note = json.dumps({"type": "deb", "os": "Debian", "name": "libp11-3t64", "version": "0.4.16-1"})
    return {
        # libp11's provider under its own file name, no package note
        "pkcs11prov": _build(folder, "pkcs11prov.so"),
        # libp11's provider renamed, with the package note of a libp11 package
        "renamed": _build(folder, "renamed.so", f"-DNOTE_JSON={json.dumps(note)}"),
        # a provider that is neither
        "other": _build(folder, "other.so", '-DFIXED_NAME="Other Provider"'),
    }


def _dpkg_version(package: str) -> str | None:
    tool = shutil.which("dpkg-query")
    if tool is None:
        return None
    proc = subprocess.run([tool, "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _openssl_version() -> str:
    """The running OpenSSL's version string (3.0.22): the core's "openssl-version"."""
    info = ssl.OPENSSL_VERSION_INFO
    return f"{info[0]}.{info[1]}.{info[3]}"


def _headers_version() -> str:
    """The OpenSSL headers here (what the stand-ins are compiled with, as is mtls_engine)."""
    return _number_version_text(lib.mtls_built_openssl_number())


def test_the_real_pkcs11_provider() -> None:
    ok, path = _backends.provider_status()
    need(ok, path)
    params = _backends.describe_provider(path)
    assert params is not None
    # pkcs11-provider's fixed name.
    assert params["name"] == "PKCS#11 Provider"
    pkg = package_of(path)
    assert _backends.provider_implementation(path, params["name"], pkg) == "pkcs11-provider"
    dpkg = _dpkg_version("pkcs11-provider")
    need(dpkg is not None, "dpkg knows pkcs11-provider")
    assert dpkg is not None
    assert pkg is not None and (pkg.name, pkg.version, pkg.upstream) == (
        "pkcs11-provider",
        dpkg,
        upstream_version(dpkg),
    )
    if pkg.upstream == "1.0":
        # 1.0's "version" is the OpenSSL it was built with (3.0.16 on Debian
        # 12, 3.5.0 on Debian 13), the same as buildinfo.
        assert re.fullmatch(r"3\.\d+\.\d+", params["version"]) and params["buildinfo"] == params["version"]
    else:
        # Later releases give their own version (1.3.0 for Debian sid's 1.3.0).
        assert re.sub(r"(\.0)+$", "", params["version"]) == re.sub(r"(\.0)+$", "", pkg.upstream), (params, pkg)
    # Debian's pkcs11-provider carries the ELF package note (read without dpkg).
    note = elf_package_note(path)
    assert note is not None and (note["name"], note["version"]) == ("pkcs11-provider", dpkg)


def test_the_real_libp11_engine() -> None:
    need_backend("engine")
    path = _backends.engine_path()
    assert path is not None
    dpkg = _dpkg_version("libengine-pkcs11-openssl")
    need(dpkg is not None, "dpkg knows libengine-pkcs11-openssl")
    assert elf_package_note(path) is None  # Debian 12 and 13 build it without one: dpkg tells
    pkg = package_of(path)
    assert pkg is not None and (pkg.name, pkg.version, pkg.source) == ("libengine-pkcs11-openssl", dpkg, "dpkg")
    assert pkg.upstream == upstream_version(dpkg)  # 0.4.12 on Debian 12, 0.4.13 on Debian 13, 0.4.21 on sid
    assert re.fullmatch(r"0\.4\.\d+", pkg.upstream)


def test_libp11_provider_is_told_by_its_file_name(stand_ins: dict[str, str]) -> None:
    path = stand_ins["pkcs11prov"]
    params = _backends.describe_provider(path)
    # Its name is only the name it was loaded under: no help.
    assert params == {"name": path, "version": _openssl_version(), "buildinfo": _headers_version()}
    assert package_of(path) is None
    assert _backends.provider_implementation(path, params["name"], None) == "libp11"


def test_libp11_provider_is_told_by_its_package(stand_ins: dict[str, str]) -> None:
    path = stand_ins["renamed"]
    assert elf_package_note(path) == {"type": "deb", "os": "Debian", "name": "libp11-3t64", "version": "0.4.16-1"}
    pkg = package_of(path)
    assert pkg is not None and (pkg.name, pkg.upstream, pkg.source) == ("libp11-3t64", "0.4.16", "elf-note")
    params = _backends.describe_provider(path)
    assert params is not None and params["name"] == path
    assert _backends.provider_implementation(path, params["name"], pkg) == "libp11"
    assert _backends.provider_implementation(path, params["name"], None) == "unknown"  # the package decides


def test_other_provider_is_unknown(stand_ins: dict[str, str]) -> None:
    path = stand_ins["other"]
    params = _backends.describe_provider(path)
    assert params is not None and params["name"] == "Other Provider"
    assert _backends.provider_implementation(path, params["name"], package_of(path)) == "unknown"


def test_not_a_provider(tmp_path: Path) -> None:
    (tmp_path / "junk.so").write_bytes(b"not an ELF file")
    assert _backends.describe_provider(str(tmp_path / "junk.so")) is None
    assert _backends.describe_provider(str(tmp_path / "missing.so")) is None
    assert elf_package_note(str(tmp_path / "junk.so")) is None


def test_the_provider_backend_refuses_libp11s_provider(
    stand_ins: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTLS_ENGINE_PKCS11_PROVIDER", stand_ins["pkcs11prov"])
    with pytest.raises(mtls_engine.BackendUnavailable) as e:
        _backends.choose("provider")
    assert str(e.value) == (
        f"backend 'provider' is unavailable: {stand_ins['pkcs11prov']} is libp11's own provider, which takes "
        "other settings than pkcs11-provider, the provider mtls_engine's provider backend configures; install "
        "pkcs11-provider (Debian 13: apt-get install pkcs11-provider; Debian 12: from bookworm-backports) and "
        "point MTLS_ENGINE_PKCS11_PROVIDER at its pkcs11.so, or use the engine backend"
    )


def _check_backends(env: dict[str, str]) -> dict[str, object]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full.pop("MTLS_ENGINE_MODULE", None)
    proc = subprocess.run([sys.executable, "-m", "mtls_engine", "check", "--json"], capture_output=True, text=True,
                          env=full, timeout=120)  # fmt: skip
    steps = {s["id"]: s for s in json.loads(proc.stdout)["steps"]}
    return steps["backends"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("which", ["pkcs11prov", "renamed"])
def test_check_reports_libp11s_provider(stand_ins: dict[str, str], which: str) -> None:
    path = stand_ins[which]
    step = _check_backends({"MTLS_ENGINE_PKCS11_PROVIDER": path})
    facts = step["facts"]["provider"]  # type: ignore[index]
    assert facts["path"] == path and facts["implementation"] == "libp11"
    assert facts["available"] is False and "is libp11's own provider" in facts["detail"]
    assert facts["params"] == {"name": path, "version": _openssl_version(), "buildinfo": _headers_version()}
    if which == "renamed":
        assert facts["version"] == "0.4.16" and facts["package"]["source"] == "elf-note"
    else:
        assert facts["version"] is None and facts["package"] is None
    if engine_api():
        assert f"provider: libp11{' 0.4.16' if which == 'renamed' else ''} ({path})" in step["summary"]  # type: ignore[operator]
    else:  # no backend at all: the step fails, saying why for each
        assert step["status"] == "fail" and f"provider: {path} is libp11's own provider" in step["summary"]  # type: ignore[operator]


def test_upstream_versions() -> None:
    assert upstream_version("1.0-3~bpo12+1") == "1.0"
    assert upstream_version("0.4.12-0.1") == "0.4.12"
    assert upstream_version("1:2.6.1-3") == "2.6.1"
    assert upstream_version("1.0") == "1.0"
    assert upstream_version("1.0-1.fc40") == "1.0"


# A provider linked against another libcrypto than this process's (as
# Debian's pkcs11-provider, linked to libcrypto.so.3, is to an OpenSSL 4
# process): its DT_NEEDED names libcrypto.so.4 from a folder of its own,
# whose library says so on stderr if anything ever loads it.
_OTHER_LIBCRYPTO = r"""
#include <stdio.h>
__attribute__((constructor)) static void loaded(void) { fputs("OTHER LIBCRYPTO LOADED\n", stderr); }
"""


def _libcrypto_in_this_process() -> str:
    """The file name of the libcrypto mapped into this process (libcrypto.so.3)."""
    with open("/proc/self/maps") as maps:
        names = {os.path.basename(line.split()[-1]) for line in maps if "/libcrypto.so" in line}
    assert len(names) == 1, names
    return names.pop()


@pytest.fixture(scope="module")
def other_libcrypto_provider(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(the stand-in provider, its folder of libraries)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    need(cc is not None, "a C compiler (Debian: gcc) builds the stand-in providers")
    assert cc is not None
    folder = tmp_path_factory.mktemp("other-libcrypto")
    libdir = folder / "lib"
    libdir.mkdir()
    ours = _libcrypto_in_this_process()
    other = "libcrypto.so.4" if ours != "libcrypto.so.4" else "libcrypto.so.3"
    (folder / "other.c").write_text(_OTHER_LIBCRYPTO)
    subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{other}", "-o", str(libdir / other), str(folder / "other.c")],
                   check=True)  # fmt: skip
    src = folder / "pkcs11.c"
    src.write_text(_STAND_IN)
    out = folder / "pkcs11.so"
    link = ["-Wl,--no-as-needed", f"-L{libdir}", f"-l:{other}", f"-Wl,-rpath,{libdir}"]
    subprocess.run([cc, "-shared", "-fPIC", '-DFIXED_NAME="PKCS#11 Provider"', "-o", str(out), str(src), *link],
                   check=True)  # fmt: skip
    return str(out), other


def test_the_provider_backend_refuses_a_provider_linked_to_another_libcrypto(
    other_libcrypto_provider: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, other = other_libcrypto_provider
    assert other in (elf_dynamic(path) or {}).get("needed", [])
    ours = _libcrypto_in_this_process()
    monkeypatch.setenv("MTLS_ENGINE_PKCS11_PROVIDER", path)
    with pytest.raises(mtls_engine.BackendUnavailable) as e:
        _backends.choose("provider")
    message = str(e.value)
    assert message.startswith(f"backend 'provider' is unavailable: the provider {path} is linked against {other}, "
                              f"but Python's ssl uses {ours} ({ssl.OPENSSL_VERSION}, ")  # fmt: skip
    assert f"install a pkcs11-provider built for {ssl.OPENSSL_VERSION}" in message
    assert "MTLS_ENGINE_PKCS11_PROVIDER" in message
    assert _libcrypto_in_this_process() == ours  # nothing loaded it


MIXED_LOAD = """
import ssl, sys, mtls_engine
try:
    mtls_engine.load_card_key(ssl.create_default_context(), "pkcs11:object=x", module=sys.argv[1],
                              backend=sys.argv[2])
except mtls_engine.Error as exc:
    print(type(exc).__name__, exc)
"""


def test_a_provider_linked_to_another_libcrypto_is_never_loaded(
    other_libcrypto_provider: tuple[str, str], pki: Pki
) -> None:
    """Neither the provider backend nor ``check`` loads it (no second
    OpenSSL, no console PIN prompt); ``check`` names both libraries."""
    path, other = other_libcrypto_provider
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MTLS_ENGINE_PKCS11_PROVIDER": path}
    proc = subprocess.run([sys.executable, "-c", MIXED_LOAD, pki.module, "provider"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"BackendUnavailable backend 'provider' is unavailable: the provider {path} is "
                                  f"linked against {other}"), proc.stdout  # fmt: skip
    assert "OTHER LIBCRYPTO LOADED" not in proc.stderr and "PIN" not in proc.stderr, proc.stderr
    env.pop("MTLS_ENGINE_MODULE", None)
    check = subprocess.run([sys.executable, "-m", "mtls_engine", "check", "--json"], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    assert "OTHER LIBCRYPTO LOADED" not in check.stderr and "PIN" not in check.stderr, check.stderr
    step = {s["id"]: s for s in json.loads(check.stdout)["steps"]}["backends"]
    facts = step["facts"]["provider"]
    assert facts["path"] == path and facts["available"] is False and facts["params"] is None
    assert facts["detail"] == facts["libcrypto_mismatch"]
    assert f"is linked against {other}, but Python's ssl uses {_libcrypto_in_this_process()}" in facts["detail"]
    if not engine_api():
        assert step["status"] == "fail"
    else:
        assert step["status"] == "warn" and facts["detail"] in step["hint"]
