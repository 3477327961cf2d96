"""HTTP libraries with a card key: requests (through CardKeyAdapter), httpx
(sync and async), aiohttp, urllib3 and asyncio streams, each over real mTLS
to a local HTTP/1.1 keep-alive server that requires a client certificate.

The code each library runs is read from docs/integrations.md, so the
documented snippets are exactly what is tested.  PKCS#11 calls are counted
through the pass-through shim (tests/p11shim) in a fresh interpreter per
test: login state and the shim's configuration belong to a process.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import mtls_engine
from mtls_engine._softhsm import CA, KeyKind
from mtls_engine.requests_adapter import CardKeyAdapter

from . import p11shim
from .conftest import TEST_PIN, Pki, need
from .helpers import ROOT, run_python
from .servers import send_json

DOC = ROOT / "docs" / "integrations.md"
LIBRARIES = ("requests", "httpx", "httpx-async", "aiohttp", "urllib3", "asyncio")
CARD_HOLDER = "commonName=card-holder ec256"


# ---- the snippets of docs/integrations.md -------------------------------------

_SNIPPET = re.compile(r"<!-- snippet: (?P<name>\S+) \(run by (?P<tests>[^)]*)\) -->\n```python\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Snippet:
    name: str
    code: str
    line: int  # in docs/integrations.md
    tests: str

    def compiled(self) -> Any:
        # Blank lines first, so tracebacks point at the right line of the doc.
        return compile("\n" * self.line + self.code, str(DOC), "exec")


def snippets() -> dict[str, Snippet]:
    text = DOC.read_text()
    found = {}
    for m in _SNIPPET.finditer(text):
        line = text.count("\n", 0, m.start("code"))
        found[m.group("name")] = Snippet(m.group("name"), m.group("code"), line, m.group("tests"))
    return found


def run_snippet(name: str, **names: Any) -> dict[str, Any]:
    """Run a documented snippet with the names it expects (ctx, SERVER,
    HOST, PORT, srv_ctx); returns its namespace."""
    namespace: dict[str, Any] = {"__name__": f"snippet_{name}", **names}
    exec(snippets()[name].compiled(), namespace)
    return namespace


def client_names(ctx: ssl.SSLContext, port: int) -> dict[str, Any]:
    return {"ctx": ctx, "SERVER": f"https://localhost:{port}", "HOST": "localhost", "PORT": port}


def test_docs_have_one_snippet_per_library_and_name_real_tests() -> None:
    found = snippets()
    assert set(found) == {*LIBRARIES, "asyncio-server"}
    for snippet in found.values():
        names = re.findall(r"\b(test_\w+)", snippet.tests)
        assert names and all(callable(globals().get(n)) for n in names), snippet.tests


# ---- a keep-alive HTTPS server that says who the client is ---------------------


def _subject(tls: ssl.SSLSocket) -> str:
    peer = tls.getpeercert() or {}
    return ",".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)


class _WhoAmI(http.server.BaseHTTPRequestHandler):
    """Answers each GET with the client's subject, the number of this TLS
    connection (1, 2, ... in the order the server accepted them) and the
    number of this request on it."""

    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 10  # an idle connection ends
    server: KeepAliveServer
    connection: ssl.SSLSocket

    def setup(self) -> None:
        super().setup()
        self.number = self.server.connected(_subject(self.connection))
        self.requests = 0

    def do_GET(self) -> None:
        self.requests += 1
        send_json(self, {"subject": _subject(self.connection), "connection": self.number, "request": self.requests})

    def log_message(self, format: str, *args: object) -> None:
        pass


class KeepAliveServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """HTTP/1.1 over TLS with ``ctx`` (a server_context); each connection's
    handshake runs in its own thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _WhoAmI)
        self.ctx = ctx
        self.port: int = self.server_address[1]
        self.subjects: list[str] = []  # of each accepted TLS connection, in order
        self.failed: list[str] = []  # handshakes that failed
        self._lock = threading.Lock()

    def connected(self, subject: str) -> int:
        with self._lock:
            self.subjects.append(subject)
            return len(self.subjects)

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.settimeout(10)
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.failed.append(str(exc))
            tls.close()
            return
        with tls:
            super().finish_request(tls, client_address)


@contextmanager
def keepalive_server(ctx: ssl.SSLContext) -> Iterator[KeepAliveServer]:
    srv = KeepAliveServer(ctx)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def server(pki: Pki) -> Iterator[KeepAliveServer]:
    """The usual test server (file key, localhost) requiring a client
    certificate from the test CA."""
    rejections: list[mtls_engine.Rejection] = []
    with keepalive_server(
        mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file, on_reject=rejections.append)
    ) as srv:
        yield srv


# requests turns verify=True into the bundle these name (when trust_env):
# tests start without them (some machines set them), and one sets one.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def _no_ca_bundle_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CA_BUNDLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def card_context(pki: Pki, backend: str = "auto") -> ssl.SSLContext:
    return mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module, pin=TEST_PIN,
                                      backend=backend)  # fmt: skip


def context_state(ctx: ssl.SSLContext) -> dict[str, Any]:
    """What a library could change on a context it is given, as far as
    Python can see: trust anchors, verification, protocol settings."""
    return {
        "cert_store_stats": ctx.cert_store_stats(),
        "ca_certs": ctx.get_ca_certs(binary_form=True),
        "verify_mode": ctx.verify_mode,
        "check_hostname": ctx.check_hostname,
        "verify_flags": ctx.verify_flags,
        "options": ctx.options,
        "minimum_version": ctx.minimum_version,
        "maximum_version": ctx.maximum_version,
    }


# ---- each library: two requests, one login, one card signature ------------------

CHILD = """
import http.client, json, os
import mtls_engine
from tests.test_integrations import client_names, context_state, run_snippet

E = os.environ
port = int(E["T_PORT"])
ctx = mtls_engine.client_context(E["T_URI"], cafile=E["T_CA"], module=E["T_MODULE"], pin=E["T_PIN"],
                                 backend=E["T_BACKEND"])
before = context_state(ctx)
ns = run_snippet(E["T_SNIPPET"], **client_names(ctx, port))
after = context_state(ctx)
# One more connection with the same context and the stdlib: one more
# signature, and still no second login.
conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
conn.request("GET", "/whoami")
third = json.loads(conn.getresponse().read())
conn.close()
print(json.dumps({"answers": [ns["first"], ns["second"], third],
                  "changed": sorted(k for k in before if before[k] != after[k])}))
"""


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return p11shim.build()
    except p11shim.ShimUnavailable as exc:
        need(False, str(exc))
        raise


@pytest.mark.parametrize("library", LIBRARIES)
def test_two_requests_one_card_signature(
    library: str, backend: str, pki: Pki, shim: Path, server: KeepAliveServer, tmp_path: Path
) -> None:
    """The documented snippet makes two requests on one client: the server
    sees one TLS connection carrying both, the card logs in once and signs
    once; the library leaves the context as it was."""
    env = {**p11shim.shim_env(pki.module, tmp_path), **pki.store.env, "T_PORT": str(server.port),
           "T_URI": pki.key_uri(KeyKind.P256), "T_CA": str(pki.ca_file), "T_MODULE": str(shim), "T_PIN": TEST_PIN,
           "T_BACKEND": backend, "T_SNIPPET": library, "PYTHONWARNINGS": "error"}  # fmt: skip
    proc = run_python(CHILD, env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    first, second, third = out["answers"]
    # Both snippet requests on connection 1 (keep-alive); the stdlib's on 2.
    assert first == {"subject": CARD_HOLDER, "connection": 1, "request": 1}
    assert second == {"subject": CARD_HOLDER, "connection": 1, "request": 2}
    assert third == {"subject": CARD_HOLDER, "connection": 2, "request": 1}
    assert server.subjects == [CARD_HOLDER, CARD_HOLDER]
    log = env["MTLS_SHIM_LOG"]
    assert p11shim.count(log, "C_Login") == 1
    assert p11shim.signatures(log) == 2  # one per TLS connection, none per request
    assert out["changed"] == []


# ---- each library keeps verifying the server ------------------------------------


@pytest.fixture(scope="module")
def bad_servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    """Servers a client with the test CA must refuse: (cert, key, what the
    client's verification says)."""
    work = tmp_path_factory.mktemp("bad-servers")
    stranger = CA.create("a CA the client does not trust").issue_server_files(work, "localhost")
    elsewhere = pki.ca.issue_server_files(work, "elsewhere.example")  # trusted CA, other host name
    return {
        "unknown-ca": (*stranger, "unable to get local issuer certificate"),
        "wrong-host": (*elsewhere, "Hostname mismatch"),
    }


def _messages(exc: BaseException) -> str:
    """The messages of an exception and of everything it wraps."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        inner = [e.__cause__, e.__context__, getattr(e, "reason", None), getattr(e, "certificate_error", None),
                 *e.args]  # fmt: skip
        todo += [i for i in inner if isinstance(i, BaseException)]
    return " | ".join(f"{type(e).__name__}: {e}" for e in seen)


@pytest.mark.parametrize("bad", ["unknown-ca", "wrong-host"])
@pytest.mark.parametrize("library", LIBRARIES)
def test_server_verification_stays_on(library: str, bad: str, pki: Pki, bad_servers: dict[str, Any]) -> None:
    cert, key, reason = bad_servers[bad]
    rejections: list[mtls_engine.Rejection] = []
    ctx = card_context(pki)
    before = context_state(ctx)
    with keepalive_server(mtls_engine.server_context(cert, key, pki.ca_file, on_reject=rejections.append)) as srv:
        with pytest.raises(Exception) as caught:
            run_snippet(library, **client_names(ctx, srv.port))
    messages = _messages(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in messages and reason in messages, messages
    assert srv.subjects == []  # no connection got through
    assert context_state(ctx) == before


# ---- requests: what CardKeyAdapter overrides, and why -----------------------------


def test_requests_adapter_uses_exactly_its_context(pki: Pki, backend: str, server: KeepAliveServer) -> None:
    ctx = card_context(pki, backend)
    before = context_state(ctx)
    adapter = CardKeyAdapter(ctx)
    url = f"https://localhost:{server.port}/whoami"
    with requests.Session() as session:
        session.mount(f"https://localhost:{server.port}/", adapter)
        answers = [session.get(url, timeout=10).json() for _ in range(3)]
        # Every pool the adapter made uses this context, as the pool key and
        # for its connections.
        _, pool_kwargs = adapter.build_connection_pool_key_attributes(
            session.prepare_request(requests.Request("GET", url)), True
        )
        assert pool_kwargs == {"ssl_context": ctx}
        assert adapter.poolmanager.connection_pool_kw["ssl_context"] is ctx
        pools = [adapter.poolmanager.pools[k] for k in adapter.poolmanager.pools.keys()]
        assert pools and all(p.conn_kw["ssl_context"] is ctx for p in pools)
    assert [a["connection"] for a in answers] == [1, 1, 1]
    assert {a["subject"] for a in answers} == {CARD_HOLDER}
    assert context_state(ctx) == before


def test_requests_adapter_ignores_the_environment_ca_bundle(
    pki: Pki, server: KeepAliveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With REQUESTS_CA_BUNDLE set, requests turns verify=True into that
    path; the adapter keeps the context's own CAs (the other CA's bundle is
    neither added nor used)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.other_ca_file))
    ctx = card_context(pki)
    before = context_state(ctx)
    with requests.Session() as session:
        session.mount("https://localhost", CardKeyAdapter(ctx))
        answer = session.get(f"https://localhost:{server.port}/whoami", timeout=10).json()
    assert answer["subject"] == CARD_HOLDER
    assert context_state(ctx) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"verify": False}, "cannot turn off server verification"),
        ({"verify": "ca.pem"}, "would add that CA bundle"),
        ({"cert": "client.pem"}, "would replace the card key"),
        ({"cert": ("client.pem", "client.key")}, "would replace the card key"),
    ],
    ids=["verify-false", "verify-bundle", "cert-file", "cert-pair"],
)
def test_requests_adapter_refuses_what_the_context_decides(
    pki: Pki, server: KeepAliveServer, kwargs: dict[str, Any], message: str
) -> None:
    ctx = card_context(pki)
    with requests.Session() as session:
        session.mount("https://localhost", CardKeyAdapter(ctx))
        with pytest.raises(ValueError, match=message):
            session.get(f"https://localhost:{server.port}/whoami", timeout=10, **kwargs)
    assert server.subjects == []  # refused before connecting


def test_requests_adapter_refuses_other_tls_settings(pki: Pki) -> None:
    ctx = card_context(pki)
    with pytest.raises(TypeError, match=r"needs an ssl\.SSLContext"):
        CardKeyAdapter("ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a client context"):
        CardKeyAdapter(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    adapter = CardKeyAdapter(ctx)
    with pytest.raises(ValueError, match="set ca_certs on that context"):
        adapter.init_poolmanager(1, 1, ca_certs=str(pki.other_ca_file))
    with pytest.raises(ValueError, match="set ssl_context on that context"):
        adapter.proxy_manager_for("http://proxy.invalid:3128", ssl_context=ssl.create_default_context())


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), remembering the targets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.targets: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b" ")[1].decode()
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                peers = {client: upstream, upstream: client}
                while True:
                    ready, _, _ = select.select(list(peers), [], [], 10)
                    if not ready:
                        return
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            return
                        peers[s].sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


def test_requests_adapter_through_a_proxy(pki: Pki, server: KeepAliveServer) -> None:
    """Through a CONNECT proxy the context still makes the TLS connection to
    the server (requests then goes through proxy_manager_for)."""
    ctx = card_context(pki)
    before = context_state(ctx)
    proxy = ConnectProxy()
    adapter = CardKeyAdapter(ctx)
    try:
        with requests.Session() as session:
            session.trust_env = False  # only the proxy given here
            session.mount("https://localhost", adapter)
            session.proxies = {"https": f"http://127.0.0.1:{proxy.port}"}
            answers = [session.get(f"https://localhost:{server.port}/whoami", timeout=10).json() for _ in range(2)]
            (manager,) = adapter.proxy_manager.values()
            assert manager.connection_pool_kw["ssl_context"] is ctx
    finally:
        proxy.close()
    assert [(a["subject"], a["connection"]) for a in answers] == [(CARD_HOLDER, 1), (CARD_HOLDER, 1)]
    assert proxy.targets == [f"localhost:{server.port}"]
    assert context_state(ctx) == before


def _requests_version() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", requests.__version__)[:3])


class _OnlyPoolManager(requests.adapters.HTTPAdapter):
    """What CardKeyAdapter would be without its overrides: the context only
    handed to urllib3's pool manager."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, ssl_context=self.ctx, **kwargs)


@pytest.mark.parametrize("verify", ["true", "environment-bundle"])
def test_requests_without_the_adapter_overrides(
    pki: Pki, server: KeepAliveServer, verify: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: requests with _OnlyPoolManager.

    verify=True: requests 2.32.0-2.32.2 put the context they preload at
    import (certifi's CAs, no client key) into the request's pool kwargs,
    which urllib3 lets override the pool manager's: the server gets no
    client certificate.  2.32.3 and 2.32.4 use the given context as it is.
    2.31 and 2.32.5+ (2.32.5 removed the preloaded context; 2.34 has none)
    use it, but cert_verify points the pool at certifi's bundle and urllib3
    loads that into the context: the card's context trusts every public CA.

    A bundle from REQUESTS_CA_BUNDLE (requests makes it the verify= of every
    request when trust_env): every version loads it into the context."""
    ctx = card_context(pki)
    assert ctx.cert_store_stats()["x509_ca"] == 1  # the test CA
    if verify == "environment-bundle":
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.other_ca_file))
    url = f"https://localhost:{server.port}/whoami"
    adapter = _OnlyPoolManager(ctx)
    version = tuple(int(part) for part in re.findall(r"\d+", requests.__version__)[:3])
    if verify == "true" and hasattr(adapter, "build_connection_pool_key_attributes"):  # requests >= 2.32.3
        _, pool_kwargs = adapter.build_connection_pool_key_attributes(requests.Request("GET", url).prepare(), True)
        assert pool_kwargs == {"cert_reqs": "CERT_REQUIRED"}  # no preloaded context (the manager has one)
    with requests.Session() as session:
        session.mount("https://localhost", adapter)
        if verify == "true" and (2, 32, 0) <= version < (2, 32, 3):
            with pytest.raises(requests.exceptions.RequestException):
                session.get(url, timeout=10)
            assert server.subjects == []  # refused: no client certificate
            assert ctx.cert_store_stats()["x509_ca"] == 1
            return
        answer = session.get(url, timeout=10).json()
    assert answer["subject"] == CARD_HOLDER
    added = ctx.cert_store_stats()["x509_ca"] - 1
    if verify == "environment-bundle":
        assert added == 1  # the other CA: the card's context now trusts servers it issued
    elif (2, 32, 3) <= version < (2, 32, 5):
        assert added == 0
    else:
        assert added > 100  # certifi's roots


# ---- asyncio: a server whose key is on a token ------------------------------------


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
        return port


def test_asyncio_server_with_card_key(pki: Pki, backend: str, tmp_path: Path) -> None:
    """asyncio.start_server with a server_context whose key is card2's,
    asyncio.open_connection with card1's client key: both handshake
    signatures by tokens, two requests on one connection."""
    pub = x509.load_pem_x509_certificate(pki.cert_file(KeyKind.P256, pki.card2).read_bytes()).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    server_cert = tmp_path / "card-server.pem"
    server_cert.write_bytes(
        pki.ca.issue(pem, "localhost", client=False, dns_names=("localhost",)).public_bytes(serialization.Encoding.PEM)
    )
    rejections: list[mtls_engine.Rejection] = []
    srv_ctx = mtls_engine.server_context(server_cert, pki.key_uri(KeyKind.P256, pki.card2), pki.ca_file,
                                         module=pki.module, pin=TEST_PIN, backend=backend,
                                         on_reject=rejections.append)  # fmt: skip
    port = _free_port()
    server_ns = run_snippet("asyncio-server", srv_ctx=srv_ctx, HOST="localhost", PORT=port)
    loop = asyncio.new_event_loop()
    task = loop.create_task(server_ns["serve"]())

    def run_server() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass  # stopped by the test

    thread = threading.Thread(target=run_server, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the asyncio server did not start"
                time.sleep(0.02)
        ns = run_snippet("asyncio", **client_names(card_context(pki, backend), port))
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
        loop.close()
    assert ns["first"] == ns["second"] == {"subject": CARD_HOLDER}
    assert rejections == []


def test_core_does_not_import_the_http_libraries() -> None:
    proc = run_python(
        "import sys, mtls_engine, mtls_engine._cli\n"
        "print(sorted(m for m in ('requests', 'httpx', 'aiohttp', 'urllib3') if m in sys.modules))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_snippet_runner_sees_the_doc_lines() -> None:
    """A failing snippet's traceback points into docs/integrations.md."""
    snippet = snippets()["urllib3"]
    first_line = DOC.read_text().splitlines()[snippet.line]
    assert first_line == snippet.code.splitlines()[0]
    assert os.path.samefile(snippet.compiled().co_filename, DOC)
