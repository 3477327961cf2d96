"""One card key, many threads: client contexts shared by 8 threads, and a
threaded server whose own key is on the token.  Every handshake must
succeed (no CKR_OPERATION_ACTIVE, no login race).

The suite runs 8 x 40 handshakes per case; the issue's full run is
``MTLS_THREAD_HANDSHAKES=1000 python -m pytest tests/test_threads.py``."""

from __future__ import annotations

import os
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mtls_engine
from mtls_engine._softhsm import KeyKind

from .conftest import Pki

THREADS = 8
PER_THREAD = int(os.environ.get("MTLS_THREAD_HANDSHAKES", "40"))


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _ThreadedTLS = self.server  # type: ignore[assignment]
        try:
            with server.ctx.wrap_socket(self.request, server_side=True) as tls:
                tls.sendall(tls.recv(64))
        except (ssl.SSLError, OSError) as exc:
            server.errors.append(repr(exc))


class _ThreadedTLS(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.errors: list[str] = []
        super().__init__(("127.0.0.1", 0), _Echo)


@contextmanager
def threaded_server(ctx: ssl.SSLContext) -> Iterator[_ThreadedTLS]:
    srv = _ThreadedTLS(ctx)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def hammer(ctx: ssl.SSLContext, port: int) -> tuple[int, list[str]]:
    """THREADS threads x PER_THREAD full handshakes, one context."""
    ok = [0] * THREADS
    failures: list[str] = []

    def run(i: int) -> None:
        for n in range(PER_THREAD):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(b"%d-%d" % (i, n))
                        if tls.recv(64) == b"%d-%d" % (i, n):
                            ok[i] += 1
            except (ssl.SSLError, OSError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return sum(ok), failures


def test_one_card_key_many_client_threads(pki: Pki, backend: str) -> None:
    ctx = mtls_engine.client_context(pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                     pin=pki.card1.pin, backend=backend)  # fmt: skip
    srv_ctx = mtls_engine.server_context(pki.server_cert, pki.server_key, pki.ca_file)
    with threaded_server(srv_ctx) as srv:
        done, failures = hammer(ctx, srv.server_address[1])
    assert failures == [] and srv.errors == []
    assert done == THREADS * PER_THREAD


def test_threaded_server_with_its_key_on_the_token(
    pki: Pki, backend: str, token_server_cert: Path, tmp_path: Path
) -> None:
    rejections: list[mtls_engine.Rejection] = []
    srv_ctx = mtls_engine.server_context(token_server_cert, pki.key_uri(KeyKind.P256, pki.card2), pki.ca_file,
                                         module=pki.module, pin=pki.card2.pin, backend=backend,
                                         on_reject=rejections.append)  # fmt: skip
    client = ssl.create_default_context(cafile=str(pki.ca_file))
    cert, key = pki.ca.issue_client_files(tmp_path, "thread client")
    client.load_cert_chain(str(cert), str(key))
    with threaded_server(srv_ctx) as srv:
        done, failures = hammer(client, srv.server_address[1])
    assert failures == [] and srv.errors == [] and rejections == []
    assert done == THREADS * PER_THREAD
