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
import itertools
import os
import pty
import re
import select
import shutil
import subprocess
import sysconfig
import termios
import time
from collections.abc import Callable, Iterable, Iterator
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
        for block in re.split(r"^Slot ", out, flags=re.MULTILINE):
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

    def answer(prompt: bytes) -> bytes | None:
        if b"PIN" not in prompt:
            return None
        return (so_pin if so_pin is not None and b"SO PIN" in prompt else pin).encode()

    return run_on_tty(args, env, answer)


def run_on_tty(args: list[str], env: dict[str, str], answer: Callable[[bytes], bytes | None]) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as its terminal; each prompt (an
    unfinished last line ending in ":") is given to ``answer``, and what it
    returns (if not None) is typed, once echo is off.  Returns the exit
    status and everything the program wrote to the terminal."""
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
            start = out.rfind(b"\n") + 1
            tail = out[start:]
            if start < answered or not tail.rstrip().endswith(b":"):
                continue
            reply = answer(tail)
            if reply is None:
                continue
            answered = len(out)
            # The program turns echo off with TCSAFLUSH, which discards
            # input typed before it: wait for echo to go off first.
            deadline = time.monotonic() + 10
            while termios.tcgetattr(fd)[3] & termios.ECHO and time.monotonic() < deadline:
                time.sleep(0.01)
            os.write(fd, reply + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


# ---- test PKI ------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: CA | None) -> x509.Certificate:
    """A root CA certificate (``issuer`` None: self-signed, no path length
    limit) or an intermediate one signed by ``issuer`` (path length 0)."""
    signer = issuer.key if issuer is not None else key
    usage = x509.KeyUsage(
        digital_signature=issuer is not None, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.cert.subject if issuer is not None else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(days=1))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
        f.write(data)


@dataclass
class CA:
    """A test certificate authority: a root (``create``) or an intermediate
    (``issue_ca``), with an EC P-256 key held in memory."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    _crl_numbers: Iterator[int] = field(
        default_factory=lambda: itertools.count(1), init=False, repr=False, compare=False
    )

    @classmethod
    def create(cls, name: str) -> CA:
        """A self-signed root: CA:TRUE, keyCertSign and cRLSign (critical),
        subject key identifier."""
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(name, key, _ca_certificate(name, key, None))

    def issue_ca(self, name: str) -> CA:
        """An intermediate CA signed by this one: CA:TRUE with path length 0,
        keyCertSign, cRLSign and digitalSignature (critical), subject and
        authority key identifiers."""
        key = ec.generate_private_key(ec.SECP256R1())
        return CA(name, key, _ca_certificate(name, key, self))

    @property
    def is_root(self) -> bool:
        return self.cert.issuer == self.cert.subject

    def crl(
        self,
        revoked: Iterable[x509.Certificate | int] = (),
        *,
        last_update: datetime.datetime | None = None,
        next_update: datetime.datetime | None = None,
        signer: CA | None = None,
    ) -> bytes:
        """A PEM CRL in this CA's name listing ``revoked`` (certificates or
        serial numbers), with an authority key identifier and a CRL number
        that grows with each call.  ``signer`` signs it instead of this CA
        (a CRL that claims this issuer but whose signature does not verify).
        By default it was issued a minute ago and is due in 7 days."""
        last = last_update or _now() - datetime.timedelta(minutes=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(last)
            .next_update(next_update or _now() + datetime.timedelta(days=7))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(next(self._crl_numbers)), critical=False)
        )
        for item in revoked:
            serial = item.serial_number if isinstance(item, x509.Certificate) else item
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
            )
        crl = builder.sign((signer or self).key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

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
            .subject_name(_name(common_name))
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
        key_path.write_bytes(_pkcs8(key))
        return cert_path, key_path

    def issue_client_files(
        self,
        directory: Path,
        name: str,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        chain: bool = True,
    ) -> tuple[Path, Path]:
        """A file-based client: an EC P-256 key and a clientAuth certificate
        for ``name`` issued by this CA, as ``<name>.pem`` (the certificate,
        then this CA's when it is an intermediate and ``chain``) and
        ``<name>.key`` (PKCS#8, 0600).  Returns (certificate, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        cert = self.issue(pub, name, client=True, not_before=not_before, not_after=not_after)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        pem = cert.public_bytes(serialization.Encoding.PEM)
        cert_path.write_bytes(pem + self.pem if chain and not self.is_root else pem)
        _write_private(key_path, _pkcs8(key))
        return cert_path, key_path


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
