"""TLS 1.2 renegotiation against the contexts mtls_engine hooks, driven by
stock ``openssl s_client`` / ``s_server`` (``R`` on their standard input).

A renegotiation is a second handshake on a connection: another chain from
the peer, another card signature.  mtls_engine turns it off on every
context it hooks (``OP_NO_RENEGOTIATION``), and the access rule and server
pins run on every chain anyway, for a user who turns it back on."""

from __future__ import annotations

import queue
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

import mtls_engine
from mtls_engine import _server
from mtls_engine._lib import ffi, lib, text
from mtls_engine._softhsm import CA, KeyKind

from .conftest import TEST_PIN, Pki, need

WAIT = 20.0  # seconds for a stock tool to answer; only a bound, never asserted


def _openssl_3() -> bool:
    return ssl.OPENSSL_VERSION_INFO >= (3, 0)


# SSL_OP_ALLOW_CLIENT_RENEGOTIATION (OpenSSL 3.0: a server refuses a client's
# renegotiation unless it is set; OpenSSL 1.1.1 has no such option and allows
# it).  Setting it makes a server context behave as on 1.1.1.
_ALLOW_CLIENT_RENEGOTIATION = 1 << 8 if _openssl_3() else 0
_SSL_R_NO_RENEGOTIATION = 339
_ERR_LIB_SSL = 20


def _no_renegotiation_text() -> str:
    """OpenSSL's own text for SSL_R_NO_RENEGOTIATION (what s_client and
    s_server print when the peer refuses)."""
    code = (_ERR_LIB_SSL << 23 if _openssl_3() else _ERR_LIB_SSL << 24) | _SSL_R_NO_RENEGOTIATION
    reason = lib.ERR_reason_error_string(code)
    assert reason != ffi.NULL, "OpenSSL has no text for SSL_R_NO_RENEGOTIATION"
    return text(reason)


@dataclass
class Files:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    need(shutil.which("openssl") is not None, "the openssl command drives the renegotiations")
    d = tmp_path_factory.mktemp("reneg")
    ca = CA.create("renegotiation test CA")
    (d / "ca.pem").write_bytes(ca.pem)
    return Files(d / "ca.pem", ca.issue_server_files(d, "localhost"), ca.issue_client_files(d, "renegotiating client"))


class Tool:
    """A running ``openssl`` command whose output lines are collected, to
    wait for a line before typing the next command."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(["openssl", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._new.put(raw.decode(errors="replace").rstrip("\n"))
        self._new.put(None)

    def mark(self) -> int:
        """Where the output read so far ends (for ``wait_for(since=)``)."""
        while True:
            try:
                line = self._new.get_nowait()
            except queue.Empty:
                return len(self.lines)
            if line is None:
                self._new.put(None)
                return len(self.lines)
            self.lines.append(line)

    def wait_for(self, needle: str, since: int = 0) -> str | None:
        """The first line from ``since`` on (printed or coming) containing
        ``needle``, or None when the tool ended or was silent for WAIT s."""
        for line in self.lines[since:]:
            if needle in line:
                return line
        while True:
            try:
                line = self._new.get(timeout=WAIT)
            except queue.Empty:
                return None
            if line is None:
                self._new.put(None)
                return None
            self.lines.append(line)
            if needle in line:
                return line

    def type(self, line: str) -> bool:
        """Send a line to the tool's standard input; False when it has gone."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

    def stop(self) -> str:
        """End the tool; everything it printed."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(WAIT)
        self.mark()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return "\n".join(self.lines)


# -- our server context, a client that renegotiates ------------------------------------


@dataclass
class Served:
    received: list[bytes]
    error: str | None = None


@contextmanager
def serving(ctx: ssl.SSLContext) -> Iterator[tuple[int, Served]]:
    """One connection served with ``ctx``: every read echoed back."""
    sock = socket.create_server(("127.0.0.1", 0))
    served = Served([])

    def serve() -> None:
        try:
            raw, _ = sock.accept()
        except OSError:
            return
        raw.settimeout(WAIT)
        try:
            with ctx.wrap_socket(raw, server_side=True) as tls:
                while data := tls.recv(100):
                    served.received.append(data)
                    tls.sendall(b"echo:" + data)
        except (ssl.SSLError, OSError) as exc:
            served.error = str(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], served
    finally:
        sock.close()
        thread.join(WAIT)


def client_renegotiates(port: int, f: Files) -> tuple[bool, str]:
    """s_client (TLS 1.2, with a client certificate) says hello, asks for a
    renegotiation, then sends "after".  (Whether "after" was echoed, all
    its output.)"""
    tool = Tool(["s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-servername", "localhost",
                 "-CAfile", str(f.ca), "-cert", str(f.client[0]), "-key", str(f.client[1])])  # fmt: skip
    try:
        assert tool.wait_for("Verify return code: 0"), "s_client did not connect"
        tool.type("hello")
        assert tool.wait_for("echo:hello"), "the server did not answer before the renegotiation"
        tool.type("R")
        assert tool.wait_for("RENEGOTIATING"), "s_client did not start the renegotiation"
        # Typed only now: s_client drops what else came in the read of "R".
        after = tool.type("after") and tool.wait_for("echo:after") is not None
    finally:
        out = tool.stop()
    return after, out


def counting(answers: list[bool]) -> tuple[Callable[[x509.Certificate], bool], list[str]]:
    """An access rule answering ``answers`` in turn (then no), and the
    subjects it was asked about."""
    seen: list[str] = []

    def rule(cert: x509.Certificate) -> bool:
        seen.append(cert.subject.rfc4514_string())
        return answers[len(seen) - 1] if len(seen) <= len(answers) else False

    return rule, seen


def test_server_refuses_a_renegotiation(files: Files) -> None:
    rule, seen = counting([True, True])
    ctx = mtls_engine.server_context(*files.server, files.ca, allow=rule)
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    # As OpenSSL 1.1.1 does by default: a client may renegotiate.  The
    # context still refuses, whatever this OpenSSL's default.
    ctx.options |= _ALLOW_CLIENT_RENEGOTIATION
    with serving(ctx) as (port, served):
        echoed, out = client_renegotiates(port, files)
    assert not echoed, out
    assert _no_renegotiation_text() in out
    assert served.received == [b"hello\n"]
    assert served.error is not None  # the client ended the connection with an alert
    assert seen == ["CN=renegotiating client"]


def test_server_rule_decides_on_a_renegotiation_too(files: Files) -> None:
    """A user who turns renegotiation back on: the access rule runs on the
    second chain as on the first, and its "no" ends the connection."""
    rule, seen = counting([True, False])
    ctx = mtls_engine.server_context(*files.server, files.ca, allow=rule)
    ctx.options = (ctx.options & ~ssl.OP_NO_RENEGOTIATION) | _ALLOW_CLIENT_RENEGOTIATION
    with serving(ctx) as (port, served):
        echoed, out = client_renegotiates(port, files)
    assert seen == ["CN=renegotiating client"] * 2
    assert not echoed, out
    assert served.received == [b"hello\n"]
    assert served.error is not None


def test_server_renegotiation_allowed_runs_the_rule_again(files: Files) -> None:
    rule, seen = counting([True, True])
    ctx = mtls_engine.server_context(*files.server, files.ca, allow=rule)
    ctx.options = (ctx.options & ~ssl.OP_NO_RENEGOTIATION) | _ALLOW_CLIENT_RENEGOTIATION
    with serving(ctx) as (port, served):
        echoed, out = client_renegotiates(port, files)
    assert echoed, out
    assert served.received == [b"hello\n", b"after\n"]
    assert served.error is None
    assert seen == ["CN=renegotiating client"] * 2


# -- our client context, a server that starts a renegotiation ----------------------------


@contextmanager
def s_server(pki: Pki) -> Iterator[tuple[Tool, int]]:
    """s_server, TLS 1.2, no resumption (a renegotiation is then a full
    handshake, the server's chain and the client's certificate again)."""
    tool = Tool(["s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-tls1_2", "-no_cache", "-no_ticket",
                 "-cert", str(pki.server_cert), "-key", str(pki.server_key), "-CAfile", str(pki.ca_file)])  # fmt: skip
    try:
        line = tool.wait_for("ACCEPT")
        assert line is not None, "s_server did not start: " + "\n".join(tool.lines)
        yield tool, int(line.rsplit(":", 1)[1])
    finally:
        tool.stop()


def card_client(pki: Pki) -> tuple[ssl.SSLContext, list[int]]:
    """A card client context with server pins, and a list counting the pin
    checks (the context's rule, wrapped)."""
    ctx = mtls_engine.client_context(key=pki.key_uri(KeyKind.P256), cafile=pki.ca_file, module=pki.module,
                                     pin=TEST_PIN, server_pins=[mtls_engine.pin_of(pki.server_cert)])  # fmt: skip
    checks: list[int] = []
    hooks = _server._BY_CONTEXT[ctx]
    pins = hooks.rule
    assert pins is not None

    def counted(cert: x509.Certificate) -> bool:
        checks.append(1)
        return pins(cert)

    hooks.rule = counted
    return ctx, checks


def server_renegotiates(tool: Tool, port: int, ctx: ssl.SSLContext) -> tuple[bytes | str, str]:
    """Connect, say hello, have s_server start a renegotiation that asks
    for the client's certificate and, once it has verified that, send
    "reply".  (What the client read, or its error; s_server's output.)"""
    got: list[bytes | str] = [b""]
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.settimeout(WAIT)

        def read() -> None:  # reading runs the renegotiation (or the refusal) on the client
            try:
                while b"reply" not in got[0] and (data := tls.recv(100)):
                    got[0] += data  # type: ignore[operator]
            except (ssl.SSLError, OSError) as exc:
                got[0] = f"{type(exc).__name__}: {exc}"

        tls.sendall(b"hello\n")
        assert tool.wait_for("hello"), "s_server did not read the client's hello"
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start = tool.mark()
        tool.type("R")
        assert tool.wait_for("SSL_do_handshake -> 1", start), "s_server did not start the renegotiation"
        if tool.wait_for("card-holder", start):  # s_server verified the card's certificate again
            tool.type("reply")
        reader.join(WAIT)
    return got[0], tool.stop()


def test_client_refuses_a_renegotiation(pki: Pki) -> None:
    ctx, checks = card_client(pki)
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    with s_server(pki) as (tool, port):
        got, out = server_renegotiates(tool, port, ctx)
    assert isinstance(got, str) and "SSLError" in got, (got, out)
    assert _no_renegotiation_text() in out
    assert "card-holder" not in out
    assert checks == [1]


def test_client_renegotiation_allowed_checks_the_pins_again(pki: Pki) -> None:
    ctx, checks = card_client(pki)
    ctx.options &= ~ssl.OP_NO_RENEGOTIATION
    with s_server(pki) as (tool, port):
        got, out = server_renegotiates(tool, port, ctx)
    assert got == b"reply\n", out
    assert "card-holder ec256" in out
    assert checks == [1, 1]
