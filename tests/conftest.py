"""Session fixtures: one throwaway SoftHSM2 token store with real keys
generated on the tokens, a test PKI, and real TLS servers on loopback."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import mtls_engine
from mtls_engine import _softhsm, testing
from mtls_engine._backends import BACKENDS, STATUS
from mtls_engine._softhsm import CA, KeyKind, Token, TokenStore

from . import p11shim

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The user PIN of the test tokens: distinctive, so that a scan for it in
# captured output cannot hit anything else (the demo PIN 00000000 would
# match every "0x00000000").
TEST_PIN = "73915284"


_PIN_IN_ERRORS: list[str] = []


def _checked_error_init(self: Exception, *args: object) -> None:
    """Every mtls_engine.Error made in this process is checked for the PIN,
    including those a test expects and catches."""
    if any(TEST_PIN in str(a) for a in args):
        _PIN_IN_ERRORS.append(type(self).__name__)
    Exception.__init__(self, *args)


mtls_engine.Error.__init__ = _checked_error_init  # type: ignore[method-assign,assignment]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """No test may let the PIN reach captured stdout, stderr, log records
    or the message of any mtls_engine error."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call":
        return
    leaks = [f"a {cls} message" for cls in _PIN_IN_ERRORS]
    _PIN_IN_ERRORS.clear()
    for name, text in (("stdout", report.capstdout), ("stderr", report.capstderr), ("log", report.caplog)):
        if TEST_PIN in text:
            leaks.append(f"captured {name}")
    if leaks and report.passed:
        report.outcome = "failed"
        report.longrepr = f"the test PIN appeared in: {', '.join(leaks)}"


def need(condition: bool, reason: str) -> None:
    """Skip locally when a tool is missing; in CI a missing tool is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"OpenSSL (ssl module): {ssl.OPENSSL_VERSION}"]
    for pkg in ("softhsm2", "libengine-pkcs11-openssl", "pkcs11-provider", "p11-kit"):
        try:
            v = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
            ).stdout
        except OSError:
            v = ""
        lines.append(f"{pkg}: {v or 'not installed'}")
    return ["; ".join(lines)]


@dataclass
class CardKeySpec:
    kind: KeyKind
    label: str
    key_id: str  # hex

    @property
    def uri_id(self) -> str:
        return "".join(f"%{self.key_id[i : i + 2]}" for i in range(0, len(self.key_id), 2))


CARD_KEYS = {
    KeyKind.RSA2048: CardKeySpec(KeyKind.RSA2048, "rsa2048", "01"),
    KeyKind.P256: CardKeySpec(KeyKind.P256, "ec256", "02"),
    KeyKind.P384: CardKeySpec(KeyKind.P384, "ec384", "03"),
}


@dataclass
class Pki:
    workdir: Path
    store: TokenStore
    ca: CA
    ca_file: Path
    other_ca_file: Path
    server_cert: Path
    server_key: Path
    card1: Token
    pintest: Token
    card2: Token
    rsa_cert_file: Path  # card1's RSA certificate as a PEM file
    folder: testing.TokenFolder

    @property
    def module(self) -> str:
        return self.store.module

    def cert_file(self, kind: KeyKind, token: Token | None = None) -> Path:
        """The PEM file of the certificate stored on the token for ``kind``."""
        spec = CARD_KEYS[kind]
        return self.workdir / f"{(token or self.card1).label}-{spec.label}-{spec.key_id}.pem"

    def key_uri_prefix(self, token: Token | None = None) -> str:
        """A URI naming only the token."""
        return (token or self.card1).uri()

    def key_uri(self, kind: KeyKind, token: Token | None = None) -> str:
        spec = CARD_KEYS[kind]
        return (token or self.card1).uri(object=spec.label, type="private")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    missing = testing.missing_tools()
    need(not missing, f"SoftHSM2 test token needs: {', '.join(missing)}")
    work = tmp_path_factory.mktemp("pki")
    # Active: every PKCS#11 load in this process sees this store (its own
    # SOFTHSM2_CONF), never the machine's own token directory.
    folder = testing.TokenFolder.create(work, ca_name="mtls_engine test CA")
    ca = folder.ca
    other = CA.create("some other CA")
    other_ca_file = work / "other-ca.pem"
    other_ca_file.write_bytes(other.pem)

    c1 = folder.add_card("card1", [spec.kind for spec in CARD_KEYS.values()], pin=TEST_PIN,
                         subject="card-holder {key}")  # fmt: skip
    card1: Token = c1.token
    rsa_cert_file = work / "card1-rsa.pem"
    rsa_cert_file.write_bytes(c1.cert_file(KeyKind.RSA2048).read_bytes())
    # Two keys with one label: a URI naming that label is ambiguous.
    card1.generate_key(KeyKind.P256, "twin", "10")
    card1.generate_key(KeyKind.P256, "twin", "11")
    # A key whose certificate slot holds somebody else's certificate.
    card1.generate_key(KeyKind.P256, "wrongcert", "05")
    card1.store_certificate(c1.certificate(KeyKind.RSA2048), "wrongcert", "05", work)

    # RSA without PSS, as on many real cards.
    pub = card1.generate_rsa_without_pss("nopss", "09")
    card1.store_certificate(ca.issue(pub, "card-holder nopss"), "nopss", "09", work)

    # Tokens for PIN tests (login state is per process and token) and for
    # URIs that match more than one token.
    pintest = folder.add_card("pintest", [KeyKind.P256], pin=TEST_PIN).token
    card2 = folder.add_card("card2", [KeyKind.P256], pin=TEST_PIN).token
    yield Pki(folder.directory, cast(TokenStore, folder.store), ca, folder.ca_file, other_ca_file, folder.server_cert,
              folder.server_key, card1, pintest, card2, rsa_cert_file, folder)  # fmt: skip
    folder.close()


# mtls_engine.testing's pytest plugin, on this session's token folder and
# card1: SoftHSM2 reads its configuration, and sees the tokens, once per
# process (and a token more would change what URIs like 'pkcs11:' match).
@pytest.fixture(scope="session")
def mtls_token_folder(pki: Pki) -> testing.TokenFolder:
    return pki.folder


@pytest.fixture(scope="session")
def mtls_card(pki: Pki) -> testing.Card:
    (card1,) = [card for card in pki.folder.cards if card.label == "card1"]
    return card1


@pytest.fixture(scope="session")
def token_server_cert(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server certificate for localhost whose key is card2's P-256 key."""
    pub = x509.load_pem_x509_certificate(pki.cert_file(KeyKind.P256, pki.card2).read_bytes()).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("token-server") / "token-server.pem"
    cert = pki.ca.issue(pem, "localhost", client=False, dns_names=("localhost",))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


BACKEND_STATUS = STATUS


def engine_api() -> bool:
    """Whether this OpenSSL has an ENGINE API at all (OpenSSL 4 has none)."""
    from mtls_engine._lib import lib

    return bool(lib.MTLS_HAS_ENGINE)


def need_backend(name: str) -> None:
    """Skip (fail in CI) when backend ``name`` is unavailable; but where
    OpenSSL has no ENGINE API, the engine is not a missing tool: its tests
    skip with that reason, in CI too."""
    ok, why = BACKEND_STATUS[name]()
    if name == "engine" and not engine_api():
        pytest.skip(f"the engine backend: {why}")
    need(ok, why)


def available_backends() -> list[str]:
    """The backends this OpenSSL can have, each required (in CI) to work."""
    return [name for name in BACKENDS if name != "engine" or engine_api()]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: libp11's engine and pkcs11-provider."""
    name: str = request.param
    need_backend(name)
    return name


@pytest.fixture
def spy_log(tmp_path: Path) -> Path:
    """A pkcs11-spy log file in a temporary folder (it records PINs in clear;
    the folder is deleted with the test)."""
    return tmp_path / "pkcs11-spy.log"


@pytest.fixture
def spy() -> str:
    """OpenSC's pkcs11-spy module, which logs every PKCS#11 call it forwards."""
    path = spy_module()
    need(path is not None, "pkcs11-spy.so (Debian: opensc-pkcs11) counts PKCS#11 calls")
    assert path is not None
    return path


def spy_module() -> str | None:
    for c in _softhsm.library_candidates("pkcs11-spy.so") + _softhsm.library_candidates("pkcs11/pkcs11-spy.so"):
        if os.path.exists(c):
            return c
    return None


# Distinctive, so a scan of a log for it cannot hit anything else.
SHIM_PIN = "31415926"


@dataclass
class ShimCard:
    shim: Path
    store: TokenStore
    token: Token

    @property
    def key_uri(self) -> str:
        return self.token.uri(object="ec256", type="private")

    def env(self, state_dir: Path, **options: Any) -> dict[str, str]:
        """The child's environment: the shim configured with ``options``,
        forwarding to SoftHSM2 with this card's token store."""
        return {**p11shim.shim_env(self.store.module, state_dir, **options), **self.store.env,
                "T_MODULE": str(self.shim), "T_LABEL": self.token.label}  # fmt: skip


@pytest.fixture(scope="session")
def shim_card(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> ShimCard:
    """A token of its own behind the PKCS#11 test shim (tests/p11shim),
    whose PIN is SHIM_PIN."""
    try:
        shim = p11shim.build()
    except p11shim.ShimUnavailable as exc:
        need(False, str(exc))
        raise
    work = tmp_path_factory.mktemp("shimcard")
    # Not active: only the processes given ShimCard.env use this store.
    folder = testing.TokenFolder.create(work, ca=pki.ca, activate=False)
    token: Token = folder.add_card("shimcard", [KeyKind.P256], pin=SHIM_PIN).token
    token.generate_key(KeyKind.P256, "other", "03")  # signs in place of ec256 with sign_with="other"
    store = cast(TokenStore, folder.store)
    return ShimCard(shim, store, token)


# ---- a TPM 2.0 token (swtpm + tpm2-abrmd + tpm2-pkcs11) ----------------------

TPM_KEYS = {KeyKind.RSA2048: CARD_KEYS[KeyKind.RSA2048], KeyKind.P256: CARD_KEYS[KeyKind.P256]}


@dataclass
class TpmCard:
    tpm: Any  # mtls_engine._tpm.Tpm
    token: Any  # mtls_engine._tpm.TpmToken
    workdir: Path

    @property
    def module(self) -> str:
        return str(self.tpm.module)

    def key_uri(self, kind: KeyKind) -> str:
        return str(self.token.uri(object=TPM_KEYS[kind].label, type="private"))

    def env(self) -> dict[str, str]:
        return dict(self.tpm.env())


def _tpm_card(pki: Pki, directory: Path, label: str) -> TpmCard:
    from mtls_engine import _tpm

    missing = _tpm.missing_tools()
    need(not missing, f"the TPM 2.0 test token needs: {', '.join(missing)}")
    tpm = _tpm.Tpm.start(directory)
    try:
        token = tpm.init_token(label, pin=TEST_PIN)
        for spec in TPM_KEYS.values():
            pub = token.generate_key(spec.kind, spec.label, spec.key_id)
            token.store_certificate(pki.ca.issue(pub, f"card-holder {label} {spec.label}"), spec.label,
                                    spec.key_id, directory)  # fmt: skip
    except BaseException:
        tpm.close()
        raise
    return TpmCard(tpm, token, directory)


@pytest.fixture(scope="session")
def tpm_card(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmCard]:
    """A TPM 2.0 token (software TPM behind tpm2-abrmd on a private D-Bus)
    with an RSA-2048 and a P-256 key generated in the TPM and certificates
    from the test CA, user PIN TEST_PIN.  Reached only from child processes
    (with ``env()``): pkcs11-provider serves one module per process."""
    card = _tpm_card(pki, tmp_path_factory.mktemp("tpm"), "tpm1")
    yield card
    card.tpm.close()


@pytest.fixture
def tpm_direct(pki: Pki, tmp_path: Path) -> Iterator[TpmCard]:
    """A TPM 2.0 token of its own, reached with no resource manager (the
    simulator's socket as the TCTI, like /dev/tpm0): whatever a process
    leaves loaded stays in the TPM."""
    card = _tpm_card(pki, tmp_path / "tpm", "tpmdirect")
    try:
        card.tpm.drop_resource_manager()
        yield card
    finally:
        card.tpm.close()
