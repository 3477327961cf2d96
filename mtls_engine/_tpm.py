"""Throwaway TPM 2.0 tokens, for tests (never for a real TPM).

A software TPM (``swtpm socket --tpm2``) runs in a temporary folder; the
TSS reaches it either through a resource manager (``tpm2-abrmd`` on a
private session D-Bus, TCTI ``tabrmd:bus_type=session``), as on a machine
that runs one, or directly (TCTI ``swtpm:...``), as a process that opens
``/dev/tpm0`` does: then every object or session a process leaves loaded
stays in the TPM, which holds only 3 of each.  tpm2-pkcs11 keeps its token
store (an SQLite database) in the same folder.  Keys are generated *on* the
TPM with OpenSC's ``pkcs11-tool``; every PIN reaches it through the
environment (``env:VAR``), never through a process argument.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._softhsm import DEMO_PIN, DEMO_SO_PIN, KeyKind, library_candidates

__all__ = ["Tpm", "TpmToken", "missing_tools", "tpm2_pkcs11_module"]

# The environment variables pkcs11-tool reads the PINs from (env:VAR).
_PIN_VAR = "MTLS_ENGINE_TPM_PIN"
_SO_PIN_VAR = "MTLS_ENGINE_TPM_SO_PIN"

_KEY_TYPES = {KeyKind.RSA2048: "rsa:2048", KeyKind.P256: "EC:prime256v1", KeyKind.P384: "EC:secp384r1"}


def tpm2_pkcs11_module() -> str | None:
    """Path of tpm2-pkcs11's PKCS#11 module, or None when not installed."""
    env = os.environ.get("MTLS_ENGINE_TPM2_PKCS11_MODULE")
    if env:
        return env if os.path.exists(env) else None
    for c in library_candidates("pkcs11/libtpm2_pkcs11.so") + library_candidates("libtpm2_pkcs11.so.1"):
        if os.path.exists(c):
            return c
    return None


def _tcti_installed(name: str) -> bool:
    return any(os.path.exists(c) for c in library_candidates(f"libtss2-tcti-{name}.so.0"))


def missing_tools() -> list[str]:
    """What a TPM token needs that is not installed (Debian packages: swtpm,
    tpm2-abrmd, libtss2-tcti-tabrmd0, libtpm2-pkcs11-1,
    libtpm2-pkcs11-tools, tpm2-tools, dbus-daemon, opensc)."""
    tools = ("swtpm", "tpm2-abrmd", "tpm2_ptool", "tpm2_getcap", "dbus-daemon", "pkcs11-tool")
    missing = [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if tpm2_pkcs11_module() is None:
        missing.append("libtpm2_pkcs11.so")
    for tcti in ("tabrmd", "swtpm"):
        if not _tcti_installed(tcti):
            missing.append(f"libtss2-tcti-{tcti}.so")
    return missing


def _free_port_pair() -> int:
    """A TCP port p on loopback with p+1 free as well (swtpm's command and
    control channels; the swtpm TCTI finds the second at port + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1 for swtpm")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"swtpm did not listen on port {port} within {timeout} s")


def _sbin(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


class Tpm:
    """A software TPM with a tpm2-pkcs11 token store, in ``directory``.

    ``Tpm.start(directory)`` starts swtpm, a private D-Bus and tpm2-abrmd;
    ``drop_resource_manager()`` stops the latter two, after which every
    process reaches the TPM directly through its socket.  ``close()`` (or
    leaving a ``with`` block) stops every process it started."""

    def __init__(self, directory: Path, module: str, port: int) -> None:
        self.directory = directory
        self.module = module
        self.port = port
        self.store = directory / "store"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._bus_address: str | None = None
        self._bus_dir: str | None = None  # a short folder for the bus socket, when directory's path is too long
        self._initialised = False

    # -- processes ----------------------------------------------------------

    @classmethod
    def start(cls, directory: Path | None = None, *, resource_manager: bool = True) -> Tpm:
        """A running software TPM (and, with ``resource_manager``, tpm2-abrmd
        in front of it).  RuntimeError when a tool is missing or fails."""
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"the TPM test token needs: {', '.join(missing)}")
        module = tpm2_pkcs11_module()
        assert module is not None
        directory = Path(directory or tempfile.mkdtemp(prefix="mtls_engine-tpm-")).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        tpm = cls(directory, module, _free_port_pair())
        try:
            tpm._start_swtpm()
            if resource_manager:
                tpm._start_resource_manager()
        except BaseException:
            tpm.close()
            raise
        return tpm

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if name == "dbus" else log, stderr=log,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self._procs[name] = proc
        return proc

    def _start_swtpm(self) -> None:
        state = self.directory / "state"
        state.mkdir(exist_ok=True)
        proc = self._spawn(
            "swtpm",
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
        )  # fmt: skip
        _wait_port(self.port, proc)

    def _bus_socket(self) -> str:
        """Where the private D-Bus listens: in the TPM's folder, unless that
        path is longer than a Unix socket name may be (108 bytes; a pytest
        temporary folder easily is), then in a short folder of its own."""
        path = str(self.directory / "bus")
        if len(path.encode()) < 100:
            return path
        self._bus_dir = tempfile.mkdtemp(prefix="mtls-bus-", dir="/tmp" if os.path.isdir("/tmp") else None)
        return os.path.join(self._bus_dir, "bus")

    def _start_resource_manager(self) -> None:
        bus = self._spawn(
            "dbus",
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1",
             f"--address=unix:path={self._bus_socket()}"],
        )  # fmt: skip
        assert bus.stdout is not None
        line = bus.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"dbus-daemon printed no address (status {bus.poll()})")
        self._bus_address = line
        args = [_sbin("tpm2-abrmd"), "--session", "--flush-all", f"--tcti={self.direct_tcti}"]
        if os.geteuid() == 0:
            args.append("--allow-root")  # it refuses root otherwise
        proc = self._spawn("abrmd", args, {"DBUS_SESSION_BUS_ADDRESS": line})
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tpm2-abrmd exited: {(self.directory / 'abrmd.log').read_text()[-500:]}")
            if self._tool(["tpm2_getcap", "properties-fixed"], check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("tpm2-abrmd did not answer on its D-Bus within 15 s")
            time.sleep(0.1)

    def drop_resource_manager(self) -> None:
        """Stop tpm2-abrmd and its D-Bus: from now on the TCTI is the TPM's
        own socket, with no resource manager to flush what a process leaves."""
        for name in ("abrmd", "dbus"):
            self._stop(name)
        self._bus_address = None

    @property
    def resource_manager(self) -> bool:
        return self._bus_address is not None

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """Stop every process this TPM started (the folder stays)."""
        for name in ("abrmd", "dbus", "swtpm"):
            self._stop(name)
        self._bus_address = None
        if self._bus_dir is not None:
            shutil.rmtree(self._bus_dir, ignore_errors=True)
            self._bus_dir = None

    def __enter__(self) -> Tpm:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- environment ----------------------------------------------------------

    @property
    def direct_tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def tcti(self) -> str:
        return "tabrmd:bus_type=session" if self.resource_manager else self.direct_tcti

    def env(self) -> dict[str, str]:
        """What a process needs to reach this TPM's tokens: tpm2-pkcs11's TCTI
        and store, the private D-Bus, and the TSS's log level (its lines
        otherwise land on the process's stderr)."""
        env = {
            "TPM2_PKCS11_TCTI": self.tcti,
            "TPM2TOOLS_TCTI": self.tcti,
            "TPM2_PKCS11_STORE": str(self.store),
            "TSS2_LOG": "all+none",
        }
        if self._bus_address is not None:
            env["DBUS_SESSION_BUS_ADDRESS"] = self._bus_address
        return env

    def _tool(
        self, args: list[str], *, pins: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env(), **(pins or {})}
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {(proc.stderr.strip() or proc.stdout.strip())[-800:]}")
        return proc

    def handles(self, kind: str) -> list[str]:
        """The TPM's handles of ``kind`` (tpm2_getcap: handles-transient,
        handles-loaded-session, handles-saved-session, handles-persistent)."""
        out = self._tool(["tpm2_getcap", kind]).stdout
        return re.findall(r"0x[0-9a-fA-F]+", out)

    # -- tokens ---------------------------------------------------------------

    def init_token(self, label: str, pin: str = DEMO_PIN, so_pin: str = DEMO_SO_PIN) -> TpmToken:
        """A new initialised token with user PIN ``pin`` (needs the resource
        manager: without it tpm2_ptool runs out of object contexts)."""
        if not self._initialised:
            self.store.mkdir(exist_ok=True)
            self._tool(["tpm2_ptool", "init", f"--path={self.store}"])
            self._initialised = True
        slot = self._free_slot()
        pins = {_PIN_VAR: pin, _SO_PIN_VAR: so_pin}
        self._tool(
            ["pkcs11-tool", "--module", self.module, "--slot", str(slot), "--init-token", "--label", label,
             "--so-pin", f"env:{_SO_PIN_VAR}"],
            pins=pins,
        )  # fmt: skip
        self._tool(
            ["pkcs11-tool", "--module", self.module, "--token-label", label, "--login", "--login-type", "so",
             "--so-pin", f"env:{_SO_PIN_VAR}", "--init-pin", "--new-pin", f"env:{_PIN_VAR}"],
            pins=pins,
        )  # fmt: skip
        out = self._tool(["pkcs11-tool", "--module", self.module, "-L"]).stdout
        serial = ""
        for block in re.split(r"^Slot ", out, flags=re.MULTILINE):
            if re.search(rf"token label\s*:\s*{re.escape(label)}\s*$", block, re.MULTILINE):
                m = re.search(r"serial num\s*:\s*(\S+)", block)
                serial = m.group(1) if m else ""
        return TpmToken(self, label, pin, serial)

    def _free_slot(self) -> int:
        """The slot tpm2-pkcs11 offers for a new token (uninitialised)."""
        out = self._tool(["pkcs11-tool", "--module", self.module, "-L"]).stdout
        free = [
            int(m.group(1), 16)
            for m in re.finditer(r"^Slot \d+ \((0x[0-9a-f]+)\):.*\n\s*token state:\s+uninitialized", out, re.M)
        ]
        if not free:
            raise RuntimeError(f"tpm2-pkcs11 offers no free slot: {out}")
        return free[-1]


@dataclass
class TpmToken:
    """A token of a :class:`Tpm` (the same shape as ``_softhsm.Token``)."""

    store: Tpm
    label: str
    pin: str = field(repr=False)
    serial: str = ""
    keys: dict[str, bytes] = field(default_factory=dict)

    def uri(self, **attrs: str) -> str:
        parts = [f"token={self.label}"] + [f"{k}={v}" for k, v in attrs.items()]
        return "pkcs11:" + ";".join(parts)

    def _p11(self, args: list[str], *, login: bool = True) -> str:
        base = ["pkcs11-tool", "--module", self.store.module, "--token-label", self.label]
        if login:
            base += ["--login", "--pin", f"env:{_PIN_VAR}"]
        return self.store._tool(base + args, pins={_PIN_VAR: self.pin}).stdout

    def generate_key(self, kind: KeyKind, label: str, key_id: str) -> bytes:
        """Generate a key pair in the TPM; returns the public key (PEM)."""
        self._p11(["--keypairgen", "--key-type", _KEY_TYPES[kind], "--id", key_id, "--label", label])
        der_path = self.store.directory / f"{self.label}-{label}-{key_id}.pub.der"
        self._p11(["--read-object", "--type", "pubkey", "--id", key_id, "-o", str(der_path)], login=False)
        pem = serialization.load_der_public_key(der_path.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.keys[label] = pem
        return pem

    def store_certificate(self, cert: x509.Certificate, label: str, key_id: str, workdir: Path) -> None:
        """Write ``cert`` onto the token (and as ``<token>-<label>-<id>.pem``
        into ``workdir``)."""
        pem_path = workdir / f"{self.label}-{label}-{key_id}.pem"
        pem_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        der_path = workdir / f"{self.label}-{label}-{key_id}.der"
        der_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        self._p11(["--write-object", str(der_path), "--type", "cert", "--id", key_id, "--label", label])
