"""Real TLS servers on loopback that require a client certificate."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def server_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(client_ca))
    return ctx


def _close_after_refusal(tls: ssl.SSLSocket) -> None:
    """Close a connection whose handshake this server refused the way a
    careful server does: after its alert, a FIN, then read what the client
    still sends until it closes.  Closing at once with unread data makes
    the kernel send a reset, which can destroy the alert before the client
    reads it (in TLS 1.3 the client reads it only after its first write)."""
    try:
        tls.shutdown(socket.SHUT_WR)
        tls.settimeout(2)
        while socket.socket.recv(tls, 4096):
            pass
    except OSError:
        pass
    finally:
        tls.close()


class EchoServer:
    """Accepts TLS connections; answers each with the client certificate's
    subject and the TLS version; remembers what it saw and refused."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[dict[str, str]] = []
        self.errors: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def accepted(self) -> Iterator[ssl.SSLSocket]:
        """Each connection, wrapped for TLS, its handshake not yet done."""
        while not self._stop:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            raw.settimeout(10)
            yield self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)

    def _serve(self) -> None:
        for tls in self.accepted():
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))
                _close_after_refusal(tls)
                continue
            try:
                with tls:
                    peer = tls.getpeercert() or {}
                    subject = ",".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
                    info = {"subject": subject, "version": tls.version() or ""}
                    self.seen.append(info)
                    tls.recv(100)
                    tls.sendall(json.dumps(info).encode())
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))

    def close(self) -> None:
        self._stop = True
        # shutdown() wakes the thread blocked in accept(); close() alone
        # does not on Linux.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the echo server thread did not stop"


@contextmanager
def echo_server(ctx: ssl.SSLContext) -> Iterator[EchoServer]:
    srv = EchoServer(ctx)
    try:
        yield srv
    finally:
        srv.close()


def send_json(handler: http.server.BaseHTTPRequestHandler, doc: object, status: int = 200) -> None:
    """Answer a request with ``doc`` as JSON (with a Content-Length, so a
    keep-alive connection stays usable)."""
    body = json.dumps(doc).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        peer = self.connection.getpeercert() or {}  # type: ignore[attr-defined]
        subject = ",".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
        send_json(self, {"subject": subject, "path": self.path})

    def log_message(self, format: str, *args: object) -> None:
        pass


class _TLSServer(http.server.ThreadingHTTPServer):
    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        # End TLS with close_notify, as a well-behaved server does: stock
        # clients (openssl s_client) report an unexpected EOF otherwise.
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(5)
                request.unwrap()
            except (OSError, ValueError):
                pass
        super().shutdown_request(request)


@contextmanager
def https_server(ctx: ssl.SSLContext, handler: type[http.server.BaseHTTPRequestHandler] = _Handler) -> Iterator[int]:
    """A threaded HTTPS server on loopback (port yielded); by default it
    answers JSON naming the client certificate's subject."""
    httpd = _TLSServer(("127.0.0.1", 0), handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


def talk(ctx: ssl.SSLContext, port: int, host: str = "localhost") -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"hello")
            data = b""
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
    return json.loads(data)
