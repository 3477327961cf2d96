"""Real handshakes through ssl.SSLContext with keys that stay on the token."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.request

import pytest

import mtls_engine
from mtls_engine._softhsm import KeyKind

from .conftest import CARD_KEYS, Pki, engine_api
from .helpers import run_python
from .servers import echo_server, https_server, server_context, talk

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.fixture(scope="module")
def srv_ctx(pki: Pki) -> ssl.SSLContext:
    return server_context(pki.server_cert, pki.server_key, pki.ca_file)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("kind", list(KeyKind), ids=lambda k: k.name)
def test_card_key_handshake(
    pki: Pki, srv_ctx: ssl.SSLContext, kind: KeyKind, version: ssl.TLSVersion, backend: str
) -> None:
    ctx = mtls_engine.client_context(
        key=pki.key_uri(kind), cafile=pki.ca_file, module=pki.module, pin=pki.card1.pin, backend=backend
    )
    ctx.minimum_version = ctx.maximum_version = version
    with echo_server(srv_ctx) as srv:
        answer = talk(ctx, srv.port)
    assert answer["subject"] == f"commonName=card-holder {CARD_KEYS[kind].label}"
    assert answer["version"] == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]


def test_load_card_key_reports_what_it_attached(pki: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    info = mtls_engine.load_card_key(ctx, pki.key_uri(KeyKind.P384), module=pki.module, pin=pki.card1.pin)
    # auto: the engine where OpenSSL has one, else the provider
    expected = "engine" if engine_api() else "provider"
    assert info.backend == expected
    assert info.backend_reason.startswith(f"{expected} (auto: ")
    assert info.token.label == "card1"
    assert info.key_type == "EC-384"
    assert info.key_id == b"\x03"
    assert info.subject == "CN=card-holder ec384"
    assert pki.card1.pin not in repr(info)


def test_module_from_environment(pki: Pki, monkeypatch: pytest.MonkeyPatch, srv_ctx: ssl.SSLContext) -> None:
    monkeypatch.setenv("MTLS_ENGINE_MODULE", pki.module)
    ctx = mtls_engine.client_context(key=pki.key_uri(KeyKind.P256), cafile=pki.ca_file, pin=pki.card1.pin)
    with echo_server(srv_ctx) as srv:
        assert talk(ctx, srv.port)["subject"] == "commonName=card-holder ec256"


def test_certificate_from_pem_file(pki: Pki, srv_ctx: ssl.SSLContext, backend: str) -> None:
    ctx = mtls_engine.client_context(
        key=pki.key_uri(KeyKind.RSA2048), cert=pki.rsa_cert_file, cafile=pki.ca_file,
        module=pki.module, pin=pki.card1.pin, backend=backend,
    )  # fmt: skip
    with echo_server(srv_ctx) as srv:
        assert talk(ctx, srv.port)["subject"] == "commonName=card-holder rsa2048"


def test_certificate_by_uri(pki: Pki, srv_ctx: ssl.SSLContext, backend: str) -> None:
    ctx = mtls_engine.client_context(
        key=pki.card1.uri(id="%02"), cert=pki.card1.uri(object="ec256", type="cert"),
        cafile=pki.ca_file, module=pki.module, pin=pki.card1.pin, backend=backend,
    )  # fmt: skip
    with echo_server(srv_ctx) as srv:
        assert talk(ctx, srv.port)["subject"] == "commonName=card-holder ec256"


def test_pin_callable_gets_token_info(pki: Pki) -> None:
    """In a fresh process (login state is per process): the callable is
    asked once, with the token's info; a second load asks nothing."""
    code = f"""
import ssl, mtls_engine
asked = []
def pin(token):
    asked.append((token.label, token.serial))
    return open({str(pki.workdir / "card2.pin")!r}).read()
for _ in range(2):
    ctx = ssl.create_default_context()
    mtls_engine.load_card_key(ctx, {pki.key_uri(KeyKind.P256, pki.card2)!r}, module={pki.module!r}, pin=pin)
print(asked)
"""
    (pki.workdir / "card2.pin").write_text(pki.card2.pin)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr([("card2", pki.card2.serial)])


def test_server_verification_is_on_by_default_wrong_ca(pki: Pki, srv_ctx: ssl.SSLContext) -> None:
    ctx = mtls_engine.client_context(
        key=pki.key_uri(KeyKind.P256), cafile=pki.other_ca_file, module=pki.module, pin=pki.card1.pin
    )
    with echo_server(srv_ctx) as srv:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            talk(ctx, srv.port)


def test_server_verification_is_on_by_default_wrong_host(pki: Pki, srv_ctx: ssl.SSLContext) -> None:
    ctx = mtls_engine.client_context(
        key=pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module, pin=pki.card1.pin
    )
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with echo_server(srv_ctx) as srv:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            talk(ctx, srv.port, host="not-localhost.example")


def test_server_without_card_sees_no_certificate(pki: Pki, srv_ctx: ssl.SSLContext) -> None:
    """Control: the same server refuses a client without the card key."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    with echo_server(srv_ctx) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError, json.JSONDecodeError)):
            talk(ctx, srv.port)


def test_urllib_and_http_client(pki: Pki, backend: str) -> None:
    ctx = mtls_engine.client_context(
        key=pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module, pin=pki.card1.pin, backend=backend
    )
    srv = server_context(pki.server_cert, pki.server_key, pki.ca_file)
    with https_server(srv) as port:
        with urllib.request.urlopen(f"https://localhost:{port}/urllib", context=ctx, timeout=10) as resp:
            assert json.load(resp) == {"subject": "commonName=card-holder ec256", "path": "/urllib"}
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        try:
            conn.request("GET", "/http.client")
            body = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        assert body == {"subject": "commonName=card-holder ec256", "path": "/http.client"}


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_rsa_key_without_pss(pki: Pki, srv_ctx: ssl.SSLContext, version: ssl.TLSVersion, backend: str) -> None:
    """A card that cannot sign RSA-PSS: mtls_engine restricts the context to
    PKCS#1 v1.5 and TLS 1.2 and says so, instead of failing with 'EVP lib'."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = version
    info = mtls_engine.load_card_key(
        ctx, pki.card1.uri(object="nopss", type="private"), module=pki.module, pin=pki.card1.pin, backend=backend
    )
    assert info.notes == ("the token cannot sign RSA-PSS: using PKCS#1 v1.5 signatures and TLS 1.2 at most",)
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_2
    with echo_server(srv_ctx) as srv:
        answer = talk(ctx, srv.port)
    assert answer == {"subject": "commonName=card-holder nopss", "version": "TLSv1.2"}


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_rsa_key_without_pss_fails_without_the_adaptation(
    pki: Pki, srv_ctx: ssl.SSLContext, version: ssl.TLSVersion, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: the same key, the same TLS-1.3-capable
    server, with the adaptation switched off, fails the handshake (TLS 1.3
    needs PSS; in TLS 1.2 both sides prefer PSS)."""
    from mtls_engine import _api

    monkeypatch.setattr(_api, "can_sign_pss", lambda *args: True)  # pretend: no adaptation
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.maximum_version = version
    info = mtls_engine.load_card_key(
        ctx, pki.card1.uri(object="nopss", type="private"), module=pki.module, pin=pki.card1.pin, backend=backend
    )
    assert info.notes == ()
    with echo_server(srv_ctx) as srv, pytest.raises(ssl.SSLError):
        talk(ctx, srv.port)


def test_rsa_key_with_pss_keeps_tls13(pki: Pki, backend: str) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    info = mtls_engine.load_card_key(
        ctx, pki.key_uri(KeyKind.RSA2048), module=pki.module, pin=pki.card1.pin, backend=backend
    )
    assert info.notes == ()
    assert ctx.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
