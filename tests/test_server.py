"""The server side: every check of mutual authentication, over real TLS 1.2
and 1.3 handshakes, asserting what the client sees *and* the reason the
server gives (``on_reject``)."""

from __future__ import annotations

import base64
import datetime
import shutil
import ssl
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

import mtls_engine
from mtls_engine._context import ssl_ctx_pointer
from mtls_engine._lib import ffi, lib
from mtls_engine._softhsm import CA, KeyKind

from .conftest import Pki, need
from .helpers import ca_names_seen, client_hello
from .servers import echo_server, talk

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


@dataclass
class World:
    """A root CA with an intermediate, the server's files, and file-key clients."""

    pki: Pki
    dir: Path
    root: CA
    inter: CA
    roots_file: Path  # root + intermediate: the server's client CAs
    good: tuple[Path, Path]
    via_inter: tuple[Path, Path]
    stranger: tuple[Path, Path]
    expired: tuple[Path, Path]
    future: tuple[Path, Path]

    def crl_file(self, name: str, *pems: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(b"".join(pems))
        return path


@pytest.fixture(scope="module")
def world(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> World:
    d = tmp_path_factory.mktemp("server")
    root = pki.ca
    inter = root.issue_ca("mtls_engine test intermediate CA")
    roots = d / "client-cas.pem"
    roots.write_bytes(root.pem + inter.pem)
    other = CA.create("a CA nobody trusts")
    return World(
        pki, d, root, inter, roots,
        good=root.issue_client_files(d, "good client"),
        via_inter=inter.issue_client_files(d, "intermediate client"),
        stranger=other.issue_client_files(d, "stranger"),
        expired=root.issue_client_files(d, "expired client", not_before=NOW - 30 * DAY, not_after=NOW - DAY),
        future=root.issue_client_files(d, "future client", not_before=NOW + DAY, not_after=NOW + 30 * DAY),
    )  # fmt: skip


def client_ctx(w: World, files: tuple[Path, Path] | None, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(w.pki.ca_file))
    ctx.maximum_version = version
    if files is not None:
        ctx.load_cert_chain(str(files[0]), str(files[1]))
    return ctx


def serial_of(files: tuple[Path, Path]) -> str:
    return f"{x509.load_pem_x509_certificate(files[0].read_bytes()).serial_number:x}"


@pytest.fixture
def rejections() -> list[mtls_engine.Rejection]:
    return []


def server(w: World, rejections: list[mtls_engine.Rejection], **kw: object) -> ssl.SSLContext:
    return mtls_engine.server_context(
        w.pki.server_cert,
        w.pki.server_key,
        w.roots_file,
        on_reject=rejections.append,
        **kw,  # type: ignore[arg-type]
    )


def attempt(srv: ssl.SSLContext, ctx: ssl.SSLContext) -> dict[str, str] | ssl.SSLError:
    with echo_server(srv) as s:
        try:
            return talk(ctx, s.port)
        except ssl.SSLError as exc:
            return exc


def refused(result: object, client_sees: str) -> None:
    assert isinstance(result, ssl.SSLError), result
    if sys.version_info >= (3, 13) and str(result).startswith("General Error"):
        # CPython 3.13's _ssl sometimes reports a TLS 1.3 alert that arrives
        # after the handshake as "General Error" (seen 1 run in 2 in the
        # matrix); the server-side reason each test asserts is unaffected.
        return
    assert client_sees in str(result), str(result)


# -- each outcome, both TLS versions -------------------------------------------


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_valid_card_client_is_accepted(
    world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion, backend: str
) -> None:
    pki = world.pki
    ctx = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                     pin=pki.card1.pin, backend=backend)  # fmt: skip
    ctx.maximum_version = version
    answer = attempt(server(world, rejections), ctx)
    assert answer == {"subject": "commonName=card-holder ec256", "version": version.name.replace("v1_", "v1.")}
    assert rejections == []


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_no_client_certificate(world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion) -> None:
    result = attempt(server(world, rejections), client_ctx(world, None, version))
    refused(result, "certificate required" if version is ssl.TLSVersion.TLSv1_3 else "handshake failure")
    (r,) = rejections
    assert (r.reason, r.subject, r.serial) == ("no_certificate", None, None)
    assert r.detail == "the client sent no certificate"
    assert r.peer is not None and r.peer.startswith("127.0.0.1:")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_unknown_ca(world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion) -> None:
    result = attempt(server(world, rejections), client_ctx(world, world.stranger, version))
    refused(result, "unknown ca")
    (r,) = rejections
    assert (r.reason, r.subject, r.serial) == ("unknown_ca", "CN=stranger", serial_of(world.stranger))
    assert r.issuer == "CN=a CA nobody trusts"
    assert r.detail == "unable to get local issuer certificate"
    assert str(r).startswith(f"refused client {r.peer} (CN=stranger, serial {r.serial}): unknown_ca")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_expired(world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion) -> None:
    result = attempt(server(world, rejections), client_ctx(world, world.expired, version))
    refused(result, "certificate expired")
    (r,) = rejections
    assert (r.reason, r.subject, r.serial, r.depth) == ("expired", "CN=expired client", serial_of(world.expired), 0)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_not_yet_valid(world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion) -> None:
    result = attempt(server(world, rejections), client_ctx(world, world.future, version))
    refused(result, "bad certificate")
    (r,) = rejections
    # OpenSSL's own words for X509_V_ERR_CERT_NOT_YET_VALID (9): OpenSSL 3.6
    # added "or the system clock is incorrect" to 3.0's text.
    words = lib.X509_verify_cert_error_string(9)
    assert words != ffi.NULL and ffi.string(words).decode().startswith("certificate is not yet valid")
    assert (r.reason, r.subject, r.detail) == ("not_yet_valid", "CN=future client", ffi.string(words).decode())


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_revoked_leaf(world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion) -> None:
    good_cert = x509.load_pem_x509_certificate(world.good[0].read_bytes())
    crl = world.crl_file("leaf.crl", world.root.crl([good_cert]))
    srv = server(world, rejections, crlfile=crl)
    refused(attempt(srv, client_ctx(world, world.good, version)), "certificate revoked")
    (r,) = rejections
    assert (r.reason, r.subject, r.serial, r.depth) == ("revoked", "CN=good client", serial_of(world.good), 0)
    # a client of the same CA that the CRL does not list still gets in
    other = world.root.issue_client_files(world.dir, "unrevoked client")
    answer = attempt(srv, client_ctx(world, other, version))
    assert isinstance(answer, dict) and answer["subject"] == "commonName=unrevoked client"
    # a client of a CA without a CRL here cannot be checked: refused
    refused(attempt(srv, client_ctx(world, world.via_inter, version)), "unknown ca")
    assert [(r.reason, r.detail) for r in rejections[1:]] == [("crl_error", "unable to get certificate CRL")]


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_revoked_intermediate_with_chain_checking(
    world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion
) -> None:
    inter_cert = world.inter.cert
    crls = world.crl_file("chain.crl", world.root.crl([inter_cert]), world.inter.crl())
    ctx = client_ctx(world, world.via_inter, version)
    # leaf-only checking does not see the intermediate's revocation ...
    assert isinstance(attempt(server(world, rejections, crlfile=crls), ctx), dict)
    assert rejections == []
    # ... chain checking does, and says which certificate failed
    refused(attempt(server(world, rejections, crlfile=crls, crl_chain=True), ctx), "certificate revoked")
    (r,) = rejections
    assert (r.reason, r.depth, r.failed_subject) == ("revoked", 1, "CN=mtls_engine test intermediate CA")
    assert (r.subject, r.serial) == ("CN=intermediate client", serial_of(world.via_inter))
    assert str(r).endswith("; failing certificate at depth 1: CN=mtls_engine test intermediate CA")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_chain_checking_needs_a_crl_for_every_ca(
    world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion
) -> None:
    crls = world.crl_file("root-only.crl", world.root.crl())
    srv = server(world, rejections, crlfile=crls, crl_chain=True)
    # OpenSSL answers X509_V_ERR_UNABLE_TO_GET_CRL with an unknown_ca alert
    refused(attempt(srv, client_ctx(world, world.via_inter, version)), "alert unknown ca")
    (r,) = rejections
    assert (r.reason, r.detail) == ("crl_error", "unable to get certificate CRL")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_crl_reloaded_at_runtime_revokes_on_the_next_connection(
    world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion
) -> None:
    crl = world.crl_file(f"reload-{version.name}.crl", world.root.crl())
    srv = server(world, rejections, crlfile=crl)
    ctx = client_ctx(world, world.good, version)
    with echo_server(srv) as s:  # one running server throughout
        assert talk(ctx, s.port)["subject"] == "commonName=good client"
        good_cert = x509.load_pem_x509_certificate(world.good[0].read_bytes())
        crl.write_bytes(world.root.crl([good_cert]))
        assert mtls_engine.load_crls(srv, crl) == 1
        with pytest.raises(ssl.SSLError, match="certificate revoked"):
            talk(ctx, s.port)
        # and back: a CRL without the entry lets the client in again
        crl.write_bytes(world.root.crl())
        mtls_engine.load_crls(srv, crl)
        assert talk(ctx, s.port)["subject"] == "commonName=good client"
    assert [r.reason for r in rejections] == ["revoked"]


def test_no_resumption_by_default(world: World, rejections: list[mtls_engine.Rejection]) -> None:
    srv = server(world, rejections)
    assert lib.mtls_session_cache_mode(ssl_ctx_pointer(srv)) == 0  # SSL_SESS_CACHE_OFF
    assert srv.num_tickets == 0 and srv.options & ssl.OP_NO_TICKET
    again = server(world, rejections, resumption=True)
    assert lib.mtls_session_cache_mode(ssl_ctx_pointer(again)) != 0


def test_hooks_survive_later_settings(world: World, rejections: list[mtls_engine.Rejection]) -> None:
    srv = server(world, rejections)
    srv.verify_mode = ssl.CERT_OPTIONAL
    srv.verify_mode = ssl.CERT_REQUIRED
    srv.load_verify_locations(str(world.roots_file))
    assert lib.mtls_verify_callback_installed(ssl_ctx_pointer(srv))
    refused(attempt(srv, client_ctx(world, world.stranger, ssl.TLSVersion.TLSv1_3)), "unknown ca")
    assert [r.reason for r in rejections] == ["unknown_ca"]


def test_default_reporting_is_a_log_line(world: World, caplog: pytest.LogCaptureFixture) -> None:
    srv = mtls_engine.server_context(world.pki.server_cert, world.pki.server_key, world.roots_file)
    with caplog.at_level("WARNING", logger="mtls_engine.server"):
        refused(attempt(srv, client_ctx(world, world.expired, ssl.TLSVersion.TLSv1_3)), "certificate expired")
    (record,) = [r for r in caplog.records if r.name == "mtls_engine.server"]
    assert "(CN=expired client, serial " in record.getMessage() and ": expired — " in record.getMessage()


# -- the server's own key on the token ------------------------------------------


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_card_server_accepts_card_client(
    world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion, backend: str, tmp_path: Path
) -> None:
    pki = world.pki
    # card2 holds the server's key; its certificate names localhost
    pub = x509.load_pem_x509_certificate(pki.cert_file(KeyKind.P256, pki.card2).read_bytes()).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    server_cert = tmp_path / "card-server.pem"
    server_cert.write_bytes(
        pki.ca.issue(pem, "localhost", client=False, dns_names=("localhost",)).public_bytes(serialization.Encoding.PEM)
    )
    srv = mtls_engine.server_context(server_cert, pki.key_uri(KeyKind.P256, pki.card2), world.roots_file,
                                     module=pki.module, pin=pki.card2.pin, backend=backend,
                                     on_reject=rejections.append)  # fmt: skip
    ctx = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                     pin=pki.card1.pin, backend=backend)  # fmt: skip
    ctx.maximum_version = version
    answer = attempt(srv, ctx)
    assert answer == {"subject": "commonName=card-holder ec256", "version": version.name.replace("v1_", "v1.")}
    assert rejections == []


def test_card_server_with_rsa_key_without_pss(
    world: World, rejections: list[mtls_engine.Rejection], tmp_path: Path
) -> None:
    """A server key that cannot sign PSS is restricted like a client's:
    PKCS#1 v1.5 server signatures, TLS 1.2."""
    pki = world.pki
    card_cert = x509.load_pem_x509_certificate((pki.workdir / "card1-nopss-09.pem").read_bytes())
    pem = card_cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    server_cert = tmp_path / "nopss-server.pem"
    server_cert.write_bytes(
        pki.ca.issue(pem, "localhost", client=False, dns_names=("localhost",)).public_bytes(serialization.Encoding.PEM)
    )
    srv = mtls_engine.server_context(server_cert, pki.card1.uri(object="nopss", type="private"), world.roots_file,
                                     module=pki.module, pin=pki.card1.pin, on_reject=rejections.append)  # fmt: skip
    assert srv.maximum_version == ssl.TLSVersion.TLSv1_2
    answer = attempt(srv, client_ctx(world, world.good, ssl.TLSVersion.TLSv1_3))
    assert answer == {"subject": "commonName=good client", "version": "TLSv1.2"}
    assert rejections == []


# -- the access rule -------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_access_rule_admits_listed_identities_only(
    world: World, rejections: list[mtls_engine.Rejection], version: ssl.TLSVersion
) -> None:
    srv = server(world, rejections, allow=["subject:CN=good client", f"serial:{serial_of(world.via_inter)}"])
    assert isinstance(attempt(srv, client_ctx(world, world.good, version)), dict)
    assert isinstance(attempt(srv, client_ctx(world, world.via_inter, version)), dict)
    other = world.root.issue_client_files(world.dir, "unlisted client")
    refused(attempt(srv, client_ctx(world, other, version)), "alert handshake failure")
    (r,) = rejections
    assert (r.reason, r.subject, r.detail) == (
        "not_allowed", "CN=unlisted client", "the access rule does not admit this certificate"
    )  # fmt: skip


def test_access_rule_callable_and_failing_closed(world: World, rejections: list[mtls_engine.Rejection]) -> None:
    def broken(cert: x509.Certificate) -> bool:
        raise RuntimeError("rule bug")

    srv = server(world, rejections, allow=broken)
    refused(attempt(srv, client_ctx(world, world.good, ssl.TLSVersion.TLSv1_3)), "alert handshake failure")
    assert [r.reason for r in rejections] == ["not_allowed"]
    srv = server(world, rejections, allow=lambda c: c.subject.rfc4514_string() == "CN=good client")
    assert isinstance(attempt(srv, client_ctx(world, world.good, ssl.TLSVersion.TLSv1_3)), dict)


def test_access_rule_errors(world: World) -> None:
    for allow, message in [
        ("CN=x", "allow= takes a list of identities"),
        (["CN=x"], "allow= entry 'CN=x' is not 'kind:value'"),
        (["serial:xyz"], "the serial must be hexadecimal"),
        (["ip:1.2.3.4"], "unknown kind 'ip'"),
    ]:
        with pytest.raises(mtls_engine.ConfigError, match=message):
            server(world, [], allow=allow)


# -- bad CRLs ---------------------------------------------------------------------


def test_crl_problems_are_named(world: World, tmp_path: Path) -> None:
    stranger_ca = CA.create("not a client CA")
    cases = [
        (tmp_path / "missing.crl", None, "cannot read the CRL file .*missing.crl.*No such file"),
        (tmp_path / "garbage.crl", b"-----BEGIN X509 CRL-----\nnonsense\n-----END X509 CRL-----\n",
         "holds no readable CRL"),
        (tmp_path / "expired.crl", world.root.crl(last_update=NOW - 10 * DAY, next_update=NOW - DAY),
         r"from CN=mtls_engine test CA expired on .* \(its nextUpdate\); fetch a current CRL"),
        (tmp_path / "forged.crl", world.root.crl(signer=stranger_ca),
         "claims to be issued by CN=mtls_engine test CA but is not signed by that CA's key"),
        (tmp_path / "foreign.crl", stranger_ca.crl(),
         "issued by CN=not a client CA, which is not one of the trusted client CAs"),
    ]  # fmt: skip
    for path, data, message in cases:
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(mtls_engine.CrlError, match=message):
            server(world, [], crlfile=path)
    # a failed reload keeps the CRLs in force
    good = world.crl_file("fine.crl", world.root.crl())
    srv = server(world, [], crlfile=good)
    with pytest.raises(mtls_engine.CrlError):
        mtls_engine.load_crls(srv, tmp_path / "forged.crl")
    assert srv.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF


# -- the client side: pinning the server ---------------------------------------------


DATA = Path(__file__).resolve().parent / "data"


def _openssl_pin(cert: Path) -> str:
    """The certificate's public-key pin as the openssl command line computes
    it (the recipe curl documents for --pinnedpubkey): independent of pin_of."""
    need(shutil.which("openssl") is not None, "the openssl command line computes the expected pins")
    pem = subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"], capture_output=True, check=True)
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem.stdout, capture_output=True,
                         check=True)  # fmt: skip
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der.stdout, capture_output=True, check=True
    )
    return "sha256/" + base64.b64encode(digest.stdout).decode()


@pytest.mark.parametrize(
    ("name", "pin"),
    [
        # fixed vectors: these files' pins, computed once with
        # openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64
        ("pin-vector-ec.pem", "sha256/qUBnlLKSwB7i1/RsdNcPkkEWxrydZncQrnNxenWkLCc="),
        ("pin-vector-rsa.pem", "sha256/zSq4NHpxg3addbPezvTREyCqhM+03ktAvpQUYkqjp1Y="),
    ],
)
def test_pin_of_fixed_vectors(name: str, pin: str) -> None:
    path = DATA / name
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    for form in (path, str(path), path.read_bytes(), cert.public_bytes(serialization.Encoding.DER), cert):
        assert mtls_engine.pin_of(form) == pin  # type: ignore[arg-type]


def test_server_pinning(world: World, tmp_path: Path) -> None:
    pki = world.pki
    srv = server(world, [])
    right = _openssl_pin(pki.server_cert)
    assert mtls_engine.pin_of(pki.server_cert) == right
    ok = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                    pin=pki.card1.pin, server_pins=[right])  # fmt: skip
    assert isinstance(attempt(srv, ok), dict)
    fingerprint = x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).fingerprint(hashes.SHA256())
    by_cert = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                         pin=pki.card1.pin, server_pins=[fingerprint.hex(":")])  # fmt: skip
    assert isinstance(attempt(srv, by_cert), dict)
    other_pin = _openssl_pin(pki.cert_file(KeyKind.P256))
    assert other_pin != right
    wrong = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                       pin=pki.card1.pin, server_pins=[other_pin])  # fmt: skip
    result = attempt(srv, wrong)
    assert isinstance(result, ssl.SSLCertVerificationError) and result.verify_code == 50
    for bad in (["sha256/short"], ["abcd"], []):
        with pytest.raises(mtls_engine.ConfigError, match="pin"):
            mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                       pin=pki.card1.pin, server_pins=bad)  # fmt: skip


def old_client(w: World, **kw: object) -> ssl.SSLContext:
    """A client that can offer TLS 1.0/1.1 (security level 0), with the good client's certificate."""
    ctx = client_ctx(w, w.good, ssl.TLSVersion.TLSv1_3)
    with warnings.catch_warnings():  # ssl deprecates TLS 1.0/1.1: the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        if "maximum" in kw:
            ctx.maximum_version = kw["maximum"]  # type: ignore[assignment]
    ctx.set_ciphers(str(kw.get("ciphers", "DEFAULT:@SECLEVEL=0")))
    return ctx


def test_only_refusals_are_reported(
    world: World, rejections: list[mtls_engine.Rejection], caplog: pytest.LogCaptureFixture
) -> None:
    """A port check, plain HTTP on the TLS port, a client hanging up in the
    middle of its handshake, no TLS version or cipher in common, a client
    refusing the server's certificate, and a served client that hangs up
    without close_notify (OpenSSL 3 then sends decode_error) are not
    refusals of a client certificate: on_reject hears of none of them; the
    server's logger names them at DEBUG level, by alert name."""
    import socket

    srv = server(world, rejections)
    caplog.set_level("DEBUG", logger="mtls_engine.server")
    with echo_server(srv) as s:
        socket.create_connection(("127.0.0.1", s.port)).close()
        with socket.create_connection(("127.0.0.1", s.port)) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            plain.recv(100)
        for version in VERSIONS:  # a ClientHello, the server's answer read, then a hang-up
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
                raw.sendall(client_hello(version))
                assert raw.recv(65536)
        with pytest.raises(ssl.SSLError):  # the client offers TLS 1.1 at most
            talk(old_client(world, maximum=ssl.TLSVersion.TLSv1_1), s.port)
        with pytest.raises(ssl.SSLError):  # only a cipher suite the server lacks
            talk(old_client(world, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA:@SECLEVEL=0"), s.port)
        distrust = ssl.create_default_context(cafile=str(world.pki.other_ca_file))
        distrust.load_cert_chain(str(world.good[0]), str(world.good[1]))
        with pytest.raises(ssl.SSLCertVerificationError):  # the client refuses the server
            talk(distrust, s.port)
        ctx = client_ctx(world, world.good, ssl.TLSVersion.TLSv1_3)
        raw = socket.create_connection(("127.0.0.1", s.port))
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b"hello")
        assert b"good client" in tls.recv(4096)
        socket.socket.shutdown(tls, socket.SHUT_RDWR)  # no close_notify
        tls.close()
        refused(attempt(srv, client_ctx(world, None, ssl.TLSVersion.TLSv1_3)), "certificate required")
    assert [r.reason for r in rejections] == ["no_certificate"]
    lines = [r.getMessage() for r in caplog.records if r.name == "mtls_engine.server"]
    failed = [line.split(" failed: ", 1)[1] for line in lines if line.startswith("handshake with ")]
    assert failed == [
        "the client hung up during the TLS handshake",
        "the client hung up during the TLS handshake",
        "no TLS version in common (sent alert protocol_version)",
        "no cipher suite in common (sent alert handshake_failure)",
    ], lines
    assert not [line for line in lines if "refused" in line or "alert 50" in line or "Error" in line], lines


def test_asyncio_server_reports_refusals(world: World, rejections: list[mtls_engine.Rejection]) -> None:
    """asyncio.start_server(ssl=...) handshakes through an SSLObject and
    memory BIOs: the reasons arrive the same way (no socket: no peer
    address at that level)."""
    import asyncio

    srv = server(world, rejections)

    async def main() -> tuple[bytes, str]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            cert = writer.get_extra_info("peercert")
            subject = ",".join(f"{k}={v}" for rdn in cert["subject"] for k, v in rdn)
            writer.write(subject.encode())
            await writer.drain()
            writer.close()

        server_ = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=srv)
        port = server_.sockets[0].getsockname()[1]
        async with server_:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=client_ctx(world, world.good, ssl.TLSVersion.TLSv1_3),
                server_hostname="localhost",
            )
            good = await reader.read()
            writer.close()
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ctx(world, world.expired, ssl.TLSVersion.TLSv1_2),
                    server_hostname="localhost",
                )  # fmt: skip
                await reader.read()
                outcome = "accepted"
            except (ssl.SSLError, ConnectionError) as exc:
                # asyncio's server transport aborts a refused connection: the
                # client sees the alert or, when the reset wins, a reset
                outcome = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
        return good, outcome

    good, outcome = asyncio.run(main())
    assert good == b"commonName=good client"
    assert "certificate expired" in outcome or outcome.startswith("ConnectionResetError"), outcome
    (r,) = rejections
    assert (r.reason, r.subject) == ("expired", "CN=expired client")


# -- what the client is told: the acceptable client CA names ------------------------


def cn_of(ca: CA) -> str:
    (attr,) = ca.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attr.value)


def names_seen(srv: ssl.SSLContext, w: World, tls: str) -> list[str] | None:
    """The CA names s_client read from ``srv`` while its good client was accepted."""
    need(shutil.which("openssl") is not None, "the openssl command is not installed (Debian: openssl)")
    with echo_server(srv) as s:
        names = ca_names_seen(s.port, tls, w.pki.ca_file, *w.good)
    assert [seen["subject"] for seen in s.seen] == ["commonName=good client"], s.errors
    return names


def naming(names: list[str] | None, *cas: CA) -> bool:
    """Whether ``names`` are exactly the subjects of ``cas``, one line each."""
    return names is not None and len(names) == len(cas) and all(
        sum(line.endswith(cn_of(ca)) for line in names) == 1 for ca in cas
    )  # fmt: skip


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_client_ca_names_are_sent(world: World, rejections: list[mtls_engine.Rejection], tls: str) -> None:
    """TLS 1.2: in the CertificateRequest; TLS 1.3: its certificate_authorities extension."""
    names = names_seen(server(world, rejections), world, tls)
    assert naming(names, world.root, world.inter), names
    assert rejections == []


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_client_ca_names_can_be_withheld(world: World, rejections: list[mtls_engine.Rejection], tls: str) -> None:
    srv = server(world, rejections, send_ca_names=False)
    assert names_seen(srv, world, tls) is None
    srv.load_verify_locations(str(world.pki.other_ca_file))  # a CA loaded later: still none
    assert names_seen(srv, world, tls) is None


def test_client_ca_names_follow_cas_loaded_later_and_crl_reloads(world: World) -> None:
    srv = mtls_engine.server_context(world.pki.server_cert, world.pki.server_key, world.pki.ca_file)
    assert naming(names_seen(srv, world, "1.3"), world.root)
    srv.load_verify_locations(cadata=world.inter.pem.decode())
    assert naming(names_seen(srv, world, "1.3"), world.root, world.inter)
    assert naming(names_seen(srv, world, "1.2"), world.root, world.inter)
    # a CRL reload changes what is checked, not which CAs are named
    assert mtls_engine.load_crls(srv, world.crl_file("names.crl", world.root.crl(), world.inter.crl())) == 2
    assert naming(names_seen(srv, world, "1.3"), world.root, world.inter)


def test_describe_failure_in_an_own_accept_loop(world: World, rejections: list[mtls_engine.Rejection]) -> None:
    """One thread handshaking connection after connection names each failure
    by its own handshake, not by one that failed before on that thread."""
    import socket

    srv = server(world, rejections)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def failure_of(client: Callable[[], object]) -> BaseException:
            done = threading.Thread(target=client)
            done.start()
            conn, _ = listener.accept()
            conn.settimeout(10)
            tls = srv.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                with pytest.raises((ssl.SSLError, OSError)) as info:
                    tls.do_handshake()
            finally:
                tls.close()
                done.join(10)
            return info.value

        def no_cipher() -> None:
            with pytest.raises(ssl.SSLError):
                talk(old_client(world, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA:@SECLEVEL=0"), port)

        def hang_up() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(client_hello(ssl.TLSVersion.TLSv1_3))
                raw.recv(65536)

        def port_check() -> None:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()

        exc = failure_of(no_cipher)
        assert mtls_engine.describe_failure(exc) == "no cipher suite in common (sent alert handshake_failure)"
        assert mtls_engine.describe_failure(failure_of(hang_up)) == "the client hung up during the TLS handshake"
        assert mtls_engine.describe_failure(failure_of(port_check)) == "closed without a TLS handshake"
        failure_of(no_cipher)  # not described: the next description must not take its record
        assert mtls_engine.describe_failure(failure_of(port_check)) == "closed without a TLS handshake"
    assert rejections == []
