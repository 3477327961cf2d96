"""``python -m mtls_engine serve``: a small HTTPS server that requires a
client certificate, checks it (chain, validity, CRL, handshake signature,
optional access rule) with :func:`mtls_engine.server_context`, answers every
accepted client with its identity as JSON, and logs every refused client on
one line saying why.  A connection that ends without a decision about a
certificate (a port check, a hang-up, plain HTTP, no TLS version or cipher
in common) is no refusal: with ``--verbose``, one line naming what it was.

The listening socket is plain TCP; each accepted connection is wrapped and
its TLS handshake done in that connection's own thread, so a client that
fails (or stalls) its handshake costs only its thread and a log line: the
accept loop never sees a handshake error.  SIGHUP reloads the CRL file
(connections in progress are not dropped); SIGTERM and SIGINT stop the
server (exit 0).  Signal handlers only set flags: the main loop acts on
them, so nothing is done from inside a signal handler.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from types import FrameType
from typing import Any

from ._cliutil import add_card_arguments, cli_pin
from ._errors import ConfigError, Error
from ._identity import client_identity
from ._server import Rejection, access_rule, describe_failure, load_crls, peer_alert, server_context

__all__ = ["register", "run"]

PREFIX = "mtls_engine serve: "
HANDSHAKE_TIMEOUT = 10.0  # seconds a client gets to finish its handshake
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may stay silent
POLL_INTERVAL = 0.25  # how soon the main loop notices a signal
LINGER_TIMEOUT = 2.0  # seconds a refused client has to read the alert ...
LINGER_BYTES = 65536  # ... and what is read from it meanwhile, at most
CLOSE_TIMEOUT = 2.0  # seconds a served client has to answer the server's close_notify
# Connections the kernel holds for accept(): socketserver's default of 5
# made a burst of clients wait for a SYN retransmission (about 1 s).  The
# kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = socket.SOMAXCONN

_out_lock = threading.Lock()
_thread_state = threading.local()


def say(line: str) -> None:
    """One whole line on stderr, never interleaved with another thread's."""
    with _out_lock:
        sys.stderr.write(f"{PREFIX}{line}\n")
        sys.stderr.flush()


def _printable(text: str) -> str:
    """``text`` with control characters escaped (a request line is the
    client's to choose; a log line must stay one line)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def identity(der: bytes, tls_version: str | None, path: str) -> dict[str, Any]:
    """What the server answers an accepted client: who it is (as
    :func:`mtls_engine.client_identity` says, without the SANs), the TLS
    version and the path asked for."""
    return {**client_identity(der, san=False), "tls_version": tls_version, "path": path}


def on_reject(rejection: Rejection) -> None:
    """Called on the handshake's thread for every refused client.  When the
    peer's address could not be read any more (it hung up), the one this
    thread accepted is filled in.  (server_context reports decisions about
    the client's certificate only; other failures reach finish_request.)"""
    _thread_state.rejected = True
    peer = getattr(_thread_state, "peer", None)
    if rejection.peer is None and peer is not None:
        rejection = dataclasses.replace(rejection, peer=peer)
    say(str(rejection))


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers any GET with the client certificate's identity."""

    server_version = "mtls_engine-serve"
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    # A buffered wfile: headers and body leave in one write (one TLS record
    # for a small answer) when handle_one_request (or finish) flushes it.
    wbufsize = 16384
    connection: ssl.SSLSocket
    _subject: str | None = None  # the accepted client's, for the access log

    def _peer(self) -> str:
        return f"{self.client_address[0]}:{self.client_address[1]}"

    def do_GET(self) -> None:
        der = self.connection.getpeercert(binary_form=True)
        if der is None:  # cannot happen with CERT_REQUIRED; never answer without an identity
            self.send_error(403, "no client certificate")
            return
        doc = identity(der, self.connection.version(), self.path)
        body = json.dumps(doc).encode() + b"\n"
        self._subject = doc["subject"]  # for the access log line send_response writes
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        say(_printable(f"{self._peer()} {self._subject or '-'} {self.requestline!r} {code}"))

    def log_message(self, format: str, *args: Any) -> None:
        say(_printable(f"{self._peer()} {format % args}"))

    def log_error(self, format: str, *args: Any) -> None:
        if format.startswith("Request timed out"):  # a kept-alive client went quiet: nothing wrong
            if getattr(self.server, "verbose", False):
                say(f"connection from {self._peer()}: idle for {IDLE_TIMEOUT:g} s, closed")
            return
        super().log_error(format, *args)


class Server(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer whose connections do their TLS handshake in
    their own thread, with handshake failures logged, never raised."""

    daemon_threads = True
    timeout = POLL_INTERVAL
    verbose = False  # also log connections that end without a certificate decision
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.ssl_context: ssl.SSLContext | None = None
        super().__init__(address, Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host's FQDN up (DNS); not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        assert self.ssl_context is not None
        peer = f"{client_address[0]}:{client_address[1]}"
        _thread_state.rejected = False
        _thread_state.peer = peer
        request.settimeout(HANDSHAKE_TIMEOUT)
        # Every answer leaves in one write, so Nagle's algorithm has nothing
        # to merge: it would only hold the answer to a pipelined request
        # until the client's delayed ACK of the one before (about 40 ms).
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the client is gone already: the handshake will say so
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            self._ended(peer, describe_failure(exc))
            return
        try:
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                # A refusal was logged by on_reject, with its reason; other
                # failures (the client gave up, plain HTTP, a timeout) here.
                if not _thread_state.rejected:
                    self._ended(peer, describe_failure(exc))
                _linger(tls)
                return
            Handler(tls, client_address, self)
            _close_notify(tls)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An error after the handshake (the client reset, a bad record):
        one line with --verbose, no traceback."""
        self._ended(f"{client_address[0]}:{client_address[1]}", _describe(sys.exc_info()[1]))

    def _ended(self, peer: str, what: str) -> None:
        """A connection that ended without a certificate decision: one line, with --verbose."""
        if self.verbose:
            say(f"connection from {peer}: {what}")


def _close_notify(sock: ssl.SSLSocket) -> None:
    """End a served connection the TLS way: send close_notify, then read
    the client's (CLOSE_TIMEOUT at most) before the socket closes.

    Closing with the client's data unread (its close_notify, a request
    sent after "Connection: close") makes the kernel send a reset, and the
    client's kernel may then drop the answer it had not read yet."""
    try:
        sock.settimeout(CLOSE_TIMEOUT)
        sock.unwrap()  # sends close_notify, then waits for the client's
    except ssl.SSLError as exc:
        if exc.reason == "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
            _linger(sock)  # the client sent more: read it away, FIN, no reset
    except (OSError, ValueError):
        pass  # the client hung up or stayed silent: nothing left to read


def _linger(sock: ssl.SSLSocket) -> None:
    """Close a refused connection so that the client can read the alert.

    In TLS 1.3 the server refuses the client's Certificate before reading
    the CertificateVerify and Finished sent with it; closing a socket with
    unread data makes the kernel send a RST, and the client's kernel then
    drops the alert it had not read yet (curl then says only "getpeername()
    failed" or "Connection reset").  So: FIN after the alert, read and
    discard what the client still sends, for a short while, then close."""
    deadline = time.monotonic() + LINGER_TIMEOUT
    try:
        sock.shutdown(socket.SHUT_WR)  # also drops the failed TLS state: plain reads from here
        received = 0
        while received < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(4096)
            if not data:
                break
            received += len(data)
    except (OSError, ValueError):
        pass


def _describe(exc: BaseException | None) -> str:
    """What ended an accepted connection, in words (no exception text)."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "the client reset the connection"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the client closed the connection"
    if isinstance(exc, ssl.SSLEOFError):
        return "the client hung up without closing TLS (no close_notify)"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        alert = peer_alert(str(exc.reason))
        if alert is not None:
            return f"the client sent alert {alert}"
        return "TLS error: " + str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return "ended with an error" if exc is None else f"ended with an error ({type(exc).__name__})"


def register(sub: Any) -> None:
    """Add the subcommand to the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="an HTTPS server that requires a client certificate and says who connected (or why not)",
        description="Serve HTTPS, requiring a client certificate issued by one of --client-ca and checked against "
        "--crl; every accepted client gets its identity as JSON, every refused one is logged on standard error "
        "with the reason (connections that end without a certificate decision: with --verbose). SIGHUP reloads "
        "the CRL file; SIGTERM or SIGINT stops the server.",
    )
    p.add_argument("--cert", help="the server certificate (PEM; with a pkcs11: --key, default: the token's)")
    p.add_argument("--key", required=True, help="the server key: a PEM file or a pkcs11: URI (an HSM or token)")
    p.add_argument(
        "--client-ca", required=True, metavar="FILE", help="the CAs (PEM) whose client certificates are accepted"
    )
    p.add_argument("--crl", metavar="FILE", help="CRLs (PEM or DER) of the client CAs; reloaded on SIGHUP")
    p.add_argument(
        "--crl-chain", action="store_true", help="check every CA of the chain against a CRL too (not only the client)"
    )
    p.add_argument(
        "--allow",
        action="extend",
        nargs="+",
        type=_allow_entry,
        metavar="ID",
        help="admit only these identities: subject:<RFC 4514 name>, serial:<hex>, dns:, email:, uri: (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8443, help="port to listen on (default: 8443; 0: any free port)")
    p.add_argument(
        "--no-ca-names",
        action="store_true",
        help="do not tell clients which CAs are accepted (by default the server names the --client-ca CAs, so "
        "that a client with several certificates can pick the right one)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log, one line each, connections that end without a certificate decision (port checks, "
        "hang-ups, plain HTTP, no TLS version or cipher in common, idle keep-alive connections)",
    )
    add_card_arguments(p)
    p.set_defaults(func=run)


def _allow_entry(text: str) -> str:
    try:
        access_rule([text])
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text!r}")
    return value


def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]] | str:
    """The family and address to bind, or why ``host`` cannot be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve --host {host!r}: {exc.strerror}"
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


class _Signals:
    """What the signal handlers asked for; the main loop does it."""

    def __init__(self) -> None:
        self.reload = False
        self.stop: int | None = None

    def on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload = True

    def on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = signum


def run(args: argparse.Namespace) -> int:
    key: str = args.key
    on_token = key[:7].lower() == "pkcs11:"
    if args.cert is None and not on_token:
        print(
            "python -m mtls_engine serve: error: --cert is needed with a key file "
            "(only a pkcs11: --key can take its certificate from the token)",
            file=sys.stderr,
        )
        return 2
    where = _address(args.host, args.port)
    if isinstance(where, str):
        print(f"mtls_engine: OSError: {where}", file=sys.stderr)
        return 1
    family, address = where

    # Bind first: a port in use is reported before any PIN is asked for.
    server = Server(address, family)
    try:
        try:
            server.server_bind()
        except OSError as exc:
            hint = "; pick another --port (--port 0 takes any free one)" if exc.errno is not None else ""
            print(
                f"mtls_engine: OSError: cannot listen on {_url(args.host, args.port)}: {exc.strerror or exc}{hint}",
                file=sys.stderr,
            )
            return 1
        server.ssl_context = server_context(
            args.cert, key, args.client_ca, args.crl, module=args.module,
            pin=cli_pin(args.pin_source, key) if on_token else None, backend=args.backend,
            crl_chain=args.crl_chain, on_reject=on_reject, allow=args.allow, force=args.force,
            send_ca_names=not args.no_ca_names,
        )  # fmt: skip
        server.verbose = args.verbose
        server.server_activate()
        return _serve(server, args)
    finally:
        server.server_close()


def _url(host: str, port: int) -> str:
    return f"https://[{host}]:{port}/" if ":" in host else f"https://{host}:{port}/"


def _serve(server: Server, args: argparse.Namespace) -> int:
    assert server.ssl_context is not None
    signals = _Signals()
    if threading.current_thread() is threading.main_thread():
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signals.on_hup)
        signal.signal(signal.SIGTERM, signals.on_stop)
        signal.signal(signal.SIGINT, signals.on_stop)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    say(f"listening on {_url(host, port)} (client CAs: {args.client_ca}, CRL: {args.crl or 'none'})")
    while signals.stop is None:
        server.handle_request()  # one connection, or POLL_INTERVAL without one
        if signals.reload:
            signals.reload = False
            _reload(server.ssl_context, args.crl)
    say(f"stopped ({signal.Signals(signals.stop).name})")
    return 0


def _reload(ctx: ssl.SSLContext, crlfile: str | None) -> None:
    if crlfile is None:
        say("SIGHUP: no CRL to reload (the server was started without --crl)")
        return
    try:
        n = load_crls(ctx, crlfile)
    except Error as exc:  # CrlError (bad or expired CRL), or OpenSSL refusing it: keep the old CRLs
        say(f"CRL not reloaded: {exc}")
        return
    say(f"reloaded {n} CRL(s) from {crlfile}")
