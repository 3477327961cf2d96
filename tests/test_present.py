"""Where the card is presented: ``present_to`` on a context, and
``inject``/``extract`` for the contexts libraries make themselves.  A client
certificate tells every server that asks who the card-holder is, and the
card signs that server's handshake; a server not listed must get neither."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

import mtls_engine
from mtls_engine._server import present_matcher
from mtls_engine._softhsm import KeyKind

from .conftest import Pki
from .helpers import run_python
from .servers import echo_server, talk


def optional_server(pki: Pki) -> ssl.SSLContext:
    """A server that asks for a client certificate but also serves without
    one, so a test can see whether one was sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(str(pki.ca_file))
    return ctx


def test_present_matcher() -> None:
    m = present_matcher(["API.example.org", "*.corp.example", "127.0.0.1", "::1"])
    assert m("api.example.org") and m("api.example.org.")
    assert not m("www.example.org") and not m("example.org")
    assert m("a.corp.example") and m("x.y.corp.example") and not m("corp.example") and not m("evilcorp.example")
    assert m("127.0.0.1") and m("0:0:0:0:0:0:0:1") and not m("127.0.0.2")
    assert present_matcher(lambda h: h.endswith(".test"))("a.test")
    for bad, message in [
        ("api.example.org", "takes a list of host names"),
        (["*"], "is not a host name"),
        (["a.*.example"], "is not a host name"),
        (["https://x/"], "is not a host name"),
    ]:
        with pytest.raises(mtls_engine.ConfigError, match=message):
            present_matcher(bad)  # type: ignore[arg-type]


def test_present_to_scopes_the_card(pki: Pki, backend: str) -> None:
    ctx = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                     pin=pki.card1.pin, backend=backend, present_to=["localhost"])  # fmt: skip
    with echo_server(optional_server(pki)) as srv:
        listed = talk(ctx, srv.port, host="localhost")
        other = talk(ctx, srv.port, host="127.0.0.1")  # the server's certificate names it too
    assert listed["subject"] == "commonName=card-holder ec256"
    assert other["subject"] == ""  # asked, got no certificate


def test_present_to_refused_by_a_requiring_server(pki: Pki) -> None:
    from .servers import server_context

    ctx = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                     pin=pki.card1.pin, present_to=["elsewhere.example"])  # fmt: skip
    with echo_server(server_context(pki.server_cert, pki.server_key, pki.ca_file)) as srv:
        with pytest.raises(ssl.SSLError, match="certificate required"):
            talk(ctx, srv.port)


def test_present_to_is_for_clients(pki: Pki) -> None:
    with pytest.raises(mtls_engine.ConfigError, match="present_to= is for clients"):
        mtls_engine.load_card_key(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pki.key_uri(KeyKind.P256),
                                  module=pki.module, pin=pki.card1.pin, server=True, present_to=["x"])  # fmt: skip


INJECT = """
import json, os, ssl, socket, urllib.request
import urllib3  # imported before inject: its own reference to SSLContext is patched too
import mtls_engine
from tests.servers import echo_server, talk
E = os.environ
out = {}

def server():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(E["T_SCERT"], E["T_SKEY"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(E["T_CA"])
    return ctx

try:
    mtls_engine.inject(E["T_KEY"], present_to=[], module=E["T_MODULE"], pin=E["T_PIN"])
except mtls_engine.ConfigError as exc:
    out["empty"] = str(exc)
info = mtls_engine.inject(E["T_KEY"], present_to=["localhost"], module=E["T_MODULE"], pin=E["T_PIN"],
                          backend=E["T_BACKEND"])
out["injected"] = [mtls_engine.injected(), info.subject, ssl.SSLContext.__name__]
try:
    mtls_engine.inject(E["T_KEY"], present_to=["x"], module=E["T_MODULE"], pin=E["T_PIN"])
except mtls_engine.ConfigError as exc:
    out["twice"] = str(exc)
ctx = ssl.create_default_context(cafile=E["T_CA"])
# the attribute setters of an injected context still work (no recursion)
ctx.options |= ssl.OP_NO_COMPRESSION
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.maximum_version = ssl.TLSVersion.TLSv1_3
ctx.verify_flags |= ssl.VERIFY_X509_STRICT
ctx.verify_mode = ssl.CERT_REQUIRED
seen = []
ctx._msg_callback = lambda conn, direction, version, ctype, mtype, data: seen.append(type(mtype).__name__)
with echo_server(server()) as srv:
    out["listed"] = talk(ctx, srv.port, "localhost")["subject"]
    out["unlisted"] = talk(ctx, srv.port, "127.0.0.1")["subject"]
    out["msg_callback"] = "_TLSMessageType" in seen
    ctx._msg_callback = None
    out["urllib3_context"] = type(urllib3.util.ssl_.create_urllib3_context()).__name__
    from mtls_engine._inject import _carriers
    out["server_context_gets_card"] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) in _carriers
    mtls_engine.extract()
    out["after"] = [mtls_engine.injected(), ssl.SSLContext.__name__, urllib3.util.ssl_.SSLContext.__name__]
    out["old_context_after_extract"] = talk(ctx, srv.port, "localhost")["subject"]
    fresh = ssl.create_default_context(cafile=E["T_CA"])
    out["new_context_after_extract"] = talk(fresh, srv.port, "localhost")["subject"]
print(json.dumps(out))
"""


def test_inject_and_extract(pki: Pki, backend: str, tmp_path: Path) -> None:
    env = {"T_KEY": pki.key_uri(KeyKind.P256), "T_MODULE": pki.module, "T_PIN": pki.card1.pin, "T_BACKEND": backend,
           "T_CA": str(pki.ca_file), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key)}  # fmt: skip
    proc = run_python(INJECT, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pki.card1.pin not in proc.stdout + proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["empty"].startswith("present_to= is empty: name the servers the card may be shown to")
    assert out["injected"] == [True, "CN=card-holder ec256", "_CardContext"]
    assert out["twice"] == "a card key is already injected; call mtls_engine.extract() first"
    assert out["listed"] == "commonName=card-holder ec256"
    assert out["unlisted"] == ""  # a server not in present_to got no certificate
    assert out["msg_callback"] is True
    assert out["urllib3_context"] == "_CardContext"
    assert out["server_context_gets_card"] is False
    assert out["after"] == [False, "SSLContext", "SSLContext"]
    assert out["old_context_after_extract"] == ""  # made during the injection: presents nothing now
    assert out["new_context_after_extract"] == ""


SCOPED = """
import json, os, ssl
import mtls_engine
from tests.servers import echo_server, talk
E = os.environ
srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
srv_ctx.load_cert_chain(E["T_SCERT"], E["T_SKEY"])
srv_ctx.verify_mode = ssl.CERT_OPTIONAL
srv_ctx.load_verify_locations(E["T_CA"])
ctx = mtls_engine.client_context(E["T_KEY"], cafile=E["T_CA"], module=E["T_MODULE"], pin=E["T_PIN"],
                                 backend=E["T_BACKEND"], present_to=["localhost"])
with echo_server(srv_ctx) as srv:
    seen = [talk(ctx, srv.port, "127.0.0.1")["subject"] for _ in range(2)]
    seen.append(talk(ctx, srv.port, "localhost")["subject"])
print(json.dumps(seen))
"""


def test_an_unlisted_server_gets_no_signature_from_the_card(pki: Pki, backend: str, spy: str, spy_log: Path) -> None:
    from .helpers import count_calls

    env = {"T_KEY": pki.key_uri(KeyKind.P256), "T_MODULE": spy, "T_PIN": pki.card1.pin, "T_BACKEND": backend,
           "T_CA": str(pki.ca_file), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key),
           "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": str(spy_log)}  # fmt: skip
    proc = run_python(SCOPED, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == ["", "", "commonName=card-holder ec256"]
    assert count_calls(spy_log, "C_SignInit") == 1  # only for the listed server


UNKNOWN_NAME = """
import json, os, ssl
import mtls_engine
from tests.servers import echo_server, talk
E = os.environ
srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
srv_ctx.load_cert_chain(E["T_SCERT"], E["T_SKEY"])
srv_ctx.verify_mode = ssl.CERT_OPTIONAL
srv_ctx.load_verify_locations(E["T_CA"])


def context(present_to):
    return mtls_engine.client_context(E["T_KEY"], cafile=E["T_CA"], module=E["T_MODULE"], pin=E["T_PIN"],
                                      backend=E["T_BACKEND"], present_to=present_to)


def refuse(host):
    raise RuntimeError("a present_to predicate that fails")


out = {}
with echo_server(srv_ctx) as srv:
    nameless = context(["localhost", "127.0.0.1"])
    nameless.check_hostname = False  # no server name at all: no SNI, no name being verified
    out["no_name"] = talk(nameless, srv.port, host=None)["subject"]
    out["raising"] = talk(context(refuse), srv.port, host="localhost")["subject"]
    out["listed"] = talk(nameless, srv.port, host="localhost")["subject"]  # the control: same context, named
print(json.dumps(out))
"""


def test_no_card_for_an_unknown_name_or_a_failing_predicate(pki: Pki, backend: str, spy: str, spy_log: Path) -> None:
    """A server whose name is unknown (server_hostname=None) cannot be
    matched against present_to, and a predicate that raises cannot say yes:
    both get no certificate, and the card signs nothing for them."""
    from .helpers import count_calls

    env = {"T_KEY": pki.key_uri(KeyKind.P256), "T_MODULE": spy, "T_PIN": pki.card1.pin, "T_BACKEND": backend,
           "T_CA": str(pki.ca_file), "T_SCERT": str(pki.server_cert), "T_SKEY": str(pki.server_key),
           "PKCS11SPY": pki.module, "PKCS11SPY_OUTPUT": str(spy_log)}  # fmt: skip
    proc = run_python(UNKNOWN_NAME, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == {"no_name": "", "raising": "", "listed": "commonName=card-holder ec256"}
    assert "the present_to predicate raised; the card is not presented" in proc.stderr
    assert spy_log.exists()  # the spy did log this run: a count of 0 below would mean something
    assert count_calls(spy_log, "C_SignInit") == 1  # the listed server's handshake only
