"""Throwaway SoftHSM2 tokens and a test PKI, for the demo, tests and
benchmarks (never for real cards).

Each token store lives in its own folder with its own ``softhsm2.conf``, so
nothing touches the machine's token store.  Keys are generated *on* the
token (sensitive, never extractable) with GnuTLS's ``p11tool``; the PIN
reaches it through the environment, never through a process argument.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import os
import pty
import re
import select
import shutil
import subprocess
import sysconfig
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The documented default user PIN of the original card middleware; it exists
# only for demo and test tokens made here.
DEMO_PIN = "00000000"
DEMO_SO_PIN = "12345678"


class KeyKind(enum.Enum):
    RSA2048 = ("rsa", "--bits=2048")
    P256 = ("ecdsa", "--curve=secp256r1")
    P384 = ("ecdsa", "--curve=secp384r1")


def softhsm_module() -> str | None:
    """Path of SoftHSM2's PKCS#11 module, or None when not installed."""
    env = os.environ.get("MTLS_ENGINE_SOFTHSM_MODULE")
    if env:
        return env if os.path.exists(env) else None
    candidates = library_candidates("softhsm/libsofthsm2.so") + library_candidates("pkcs11/libsofthsm2.so")
    for c in candidates:
        if os.path.exists(c):
            return c
    return None


def library_candidates(relative: str) -> list[str]:
    """Where Debian-like and other systems install ``relative`` (e.g.
    ``softhsm/libsofthsm2.so``), this machine's multiarch folder first."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    roots = [f"/usr/lib/{multiarch}"] if multiarch else []
    roots += ["/usr/lib", "/usr/lib64", "/usr/local/lib"]
    return [os.path.join(r, relative) for r in roots]


def missing_tools() -> list[str]:
    """Tools this module needs that are not installed."""
    missing = [t for t in ("softhsm2-util", "p11tool", "pkcs11-tool") if shutil.which(t) is None]
    if softhsm_module() is None:
        missing.append("libsofthsm2.so")
    return missing


@dataclass
class TokenStore:
    """A SoftHSM2 configuration whose tokens live in ``directory``."""

    directory: Path
    module: str

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    @classmethod
    def create(cls, directory: Path) -> TokenStore:
        module = softhsm_module()
        if module is None:
            raise RuntimeError("SoftHSM2 is not installed (Debian: apt-get install softhsm2)")
        directory = directory.resolve()  # the config must work from any working directory
        directory.mkdir(parents=True, exist_ok=True)
        tokens = directory / "tokens"
        tokens.mkdir(exist_ok=True)
        store = cls(directory, module)
        store.conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        return store

    def _run(self, args: list[str], pin: str | None = None) -> str:
        env = {**os.environ, **self.env}
        if pin is not None:
            env["GNUTLS_PIN"] = pin
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def init_token(self, label: str, pin: str = DEMO_PIN, so_pin: str = DEMO_SO_PIN) -> Token:
        # softhsm2-util takes PINs as arguments or at a terminal prompt: the
        # prompt, so that no PIN is ever in a process's argument list.
        env = {**os.environ, **self.env}
        code, out = _run_with_tty_pin(["softhsm2-util", "--init-token", "--free", "--label", label], pin, env, so_pin)
        if code != 0:
            raise RuntimeError(f"softhsm2-util --init-token failed: {out.strip()}")
        out = self._run(["softhsm2-util", "--show-slots"])
        serial = ""
        for block in out.split("\n\n"):
            if re.search(rf"Label:\s+{re.escape(label)}\s*$", block, re.MULTILINE):
                m = re.search(r"Serial number:\s+(\S+)", block)
                serial = m.group(1) if m else ""
        return Token(self, label, pin, serial)


@dataclass
class Token:
    store: TokenStore
    label: str
    pin: str = field(repr=False)
    serial: str = ""
    keys: dict[str, bytes] = field(default_factory=dict)

    def uri(self, **attrs: str) -> str:
        parts = [f"token={self.label}"] + [f"{k}={v}" for k, v in attrs.items()]
        return "pkcs11:" + ";".join(parts)

    def generate_key(self, kind: KeyKind, label: str, key_id: str) -> bytes:
        """Generate a key pair on the token (p11tool makes private keys sensitive
        and never extractable); returns the public key (PEM)."""
        algo, size = kind.value
        out = self.store._run(
            ["p11tool", f"--provider={self.store.module}", "--login", f"--generate-privkey={algo}", size,
             f"--label={label}", f"--id={key_id}", f"pkcs11:token={self.label}"],
            pin=self.pin,
        )  # fmt: skip
        m = re.search(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", out, re.DOTALL)
        if not m:
            raise RuntimeError(f"p11tool printed no public key for {label}")
        pem = m.group(0).encode()
        self.keys[label] = pem
        return pem

    def generate_rsa_without_pss(self, label: str, key_id: str) -> bytes:
        """An RSA-2048 key that, like many real cards, can sign only with
        PKCS#1 v1.5 (CKA_ALLOWED_MECHANISMS).  Needs OpenSSC's pkcs11-tool,
        which reads the PIN only at a terminal: it gets one (a pty)."""
        store = self.store
        env = {**os.environ, **store.env}
        mechs = "RSA-PKCS,SHA256-RSA-PKCS,SHA384-RSA-PKCS,SHA512-RSA-PKCS"
        code, out = _run_with_tty_pin(
            ["pkcs11-tool", "--module", store.module, "--token-label", self.label, "--login", "--keypairgen",
             "--key-type", "rsa:2048", "--id", key_id, "--label", label, "--allowed-mechanisms", mechs],
            self.pin, env,
        )  # fmt: skip
        if code != 0:
            raise RuntimeError(f"pkcs11-tool --keypairgen failed: {out.strip()[-500:]}")
        der_path = store.directory / f"{self.label}-{label}.pub.der"
        store._run(
            ["pkcs11-tool", "--module", store.module, "--token-label", self.label, "--read-object",
             "--type", "pubkey", "--id", key_id, "-o", str(der_path)]
        )  # fmt: skip
        pem = serialization.load_der_public_key(der_path.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.keys[label] = pem
        return pem

    def store_certificate(self, cert: x509.Certificate, label: str, key_id: str, workdir: Path) -> None:
        path = workdir / f"{self.label}-{label}-{key_id}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.store._run(
            ["p11tool", f"--provider={self.store.module}", "--login", "--write", "--no-mark-private",
             f"--load-certificate={path}", f"--label={label}", f"--id={key_id}", f"pkcs11:token={self.label}"],
            pin=self.pin,
        )  # fmt: skip


def _run_with_tty_pin(args: list[str], pin: str, env: dict[str, str], so_pin: str | None = None) -> tuple[int, str]:
    """Run a tool that insists on reading PINs from a terminal, answering
    each of its PIN prompts through a pseudo-terminal (never through argv):
    ``so_pin`` for a prompt naming the SO PIN, else ``pin``."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.execvpe(args[0], args, env)
        finally:
            os._exit(127)
    out = b""
    answered = 0  # the output up to here has had its prompt answered
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            # A prompt is an unfinished last line naming a PIN and ending in ":".
            start = out.rfind(b"\n") + 1
            tail = out[start:]
            if start >= answered and b"PIN" in tail and tail.rstrip().endswith(b":"):
                answered = len(out)
                # The tool turns echo off with TCSAFLUSH, which discards
                # input typed before it: wait for echo to go off first.
                deadline = time.monotonic() + 10
                while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
                    time.sleep(0.01)
                secret = so_pin if so_pin is not None and b"SO PIN" in tail else pin
                os.write(fd, secret.encode() + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


# ---- test PKI ------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass
class CA:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        public_key_pem: bytes,
        common_name: str,
        *,
        client: bool = True,
        dns_names: tuple[str, ...] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> x509.Certificate:
        public_key = serialization.load_pem_public_key(public_key_pem)
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - datetime.timedelta(days=1))
            .not_valid_after(not_after or _now() + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if dns_names:
            sans: list[x509.GeneralName] = []
            for n in dns_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server_files(self, directory: Path, host: str = "localhost") -> tuple[Path, Path]:
        """A file-based server key and certificate for ``host`` (and 127.0.0.1)."""
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        cert = self.issue(pub, host, client=False, dns_names=(host, "127.0.0.1"))
        cert_path = directory / f"server-{host}.pem"
        key_path = directory / f"server-{host}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path
