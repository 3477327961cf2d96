"""asyncio streams whose TLS handshake runs off the event loop.

Why: asyncio's own TLS (``asyncio.open_connection(ssl=ctx)``,
``asyncio.start_server(ssl=ctx)``) calls ``SSLObject.do_handshake()`` from
``data_received``, on the loop's thread.  With a card key OpenSSL makes the
card sign the handshake (CertificateVerify) inside that call, so a card that
takes 70-800 ms per signature stops every task of the loop for that long, once
per handshake and per side whose key is on a card.

How (``offload=True``): TCP connect and accept stay on the loop
(``loop.create_connection`` / ``loop.create_server``, so all their keywords
work).  The TLS layer is this module's: an ``ssl.SSLObject`` over two
``ssl.MemoryBIO``, as in asyncio, but each ``do_handshake()`` step runs in a
short-lived thread of its own (CPython releases the GIL in
``SSL_do_handshake``, so the card signs while the loop runs on).  The loop
moves bytes between the socket and the BIOs only between steps, so the
SSLObject is never used by two threads at once.  After the handshake it all
runs on the loop, as asyncio's TLS does (record encryption takes
microseconds): no thread, no extra file descriptor, no copy.  The
application gets an ordinary ``StreamReader``/``StreamWriter`` pair.

Why not the blocking-``SSLSocket``-in-a-thread bridged to a
``socket.socketpair()``: an ``SSLSocket`` must not be read and written by
two threads at once (CPython drops the GIL around ``SSL_read`` and
``SSL_write`` on the same ``SSL*``), so the bridge needs a selector thread
doing non-blocking TLS I/O — as much code as this transport — and then costs
a thread and two more descriptors for every connection's lifetime, two
extra copies of every byte, and ``peername``/``sockname`` of a socketpair.

What ``writer.get_extra_info()`` gives: ``ssl_object`` (the ``SSLObject``:
``version()``, ``getpeercert(binary_form=True)``, ``selected_alpn_protocol()``
...), ``peercert``, ``cipher``, ``compression``, and from the TCP transport
``peername``, ``sockname``, ``socket``.  Not ``sslcontext`` (None): asyncio's
``StreamReaderProtocol`` closes a connection at the peer's EOF when it sees
one, and this transport keeps TLS half-close (``write_eof()`` sends
close_notify, then TCP FIN; the peer can still answer).  The context is
``get_extra_info("ssl_object").context``.

Behaviour to know:

* A handshake error (``ssl.SSLError``, ``ConnectionResetError`` when the peer
  hangs up, ``ConnectionAbortedError`` after ``ssl_handshake_timeout``,
  default 60 s) is raised by ``open_connection``.  As with blocking sockets
  and asyncio, a TLS 1.3 server's refusal of the client's certificate
  arrives after the client's handshake is complete: it is raised by the
  first read.
* A server never calls ``client_connected_cb`` for a failed handshake; its
  context's ``on_reject`` (``mtls_engine.server_context``) still reports the
  refusal, from the handshake's thread (so do ``allow`` rules).  After
  refusing, it sends FIN and waits up to 2 s for the client to close, so
  that a reset cannot destroy the alert before the client reads it.
* The peer's close_notify leaves the connection open for writing until the
  application closes it, as on a plain TCP stream (asyncio's TLS closes it
  at once).  ``close()`` sends close_notify and does not wait for the
  peer's.
* A TCP FIN without close_notify is an EOF for the reader too (as asyncio
  and ``suppress_ragged_eofs`` take it), but OpenSSL ends the TLS session
  there: it answers with a fatal ``decode_error`` alert, which goes to the
  peer as it would from a blocking ``SSLSocket``, and refuses every later
  write (the connection is then lost).  Measured the same with OpenSSL 3.0
  and 3.5; a peer that half-closes that way and still reads gets the alert.
* Bounded: each handshake step holds one thread, which ends with the step;
  a server runs at most ``max_handshakes`` steps at once (more wait on the
  loop); the bytes a peer sends during a step are capped (reading pauses).
  A step stuck in a card outlives a timeout or a cancellation (a thread
  cannot be interrupted); its connection is aborted meanwhile.
* Left on the loop thread, as in asyncio: a TLS 1.2 renegotiation that the
  server starts (some servers ask for the client certificate that way; card
  contexts refuse it unless ``OP_NO_RENEGOTIATION`` is cleared) and TLS 1.3
  post-handshake authentication (only if the client context sets
  ``post_handshake_auth``); a card signature there blocks the loop.

``offload=False`` calls asyncio's own functions unchanged (the baseline).

Measured (benchmarks/event_loop.py, a card taking 200 ms a signature, a
server with a card key and 5 card-key clients in one loop): a 10 ms ticker's
worst gap is ~20 ms with offload and ~2 s without (every signature of a
loop iteration runs back to back); bulk echo throughput is within ~15% of
asyncio's TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
import threading
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any, Optional, cast

from ._lib import lib

__all__ = ["open_connection", "start_server"]

log = logging.getLogger("mtls_engine.aio")

ClientConnectedCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Optional[Awaitable[None]]]

_LIMIT = 2**16  # asyncio's StreamReader default
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's ssl_handshake_timeout default
_SHUTDOWN_TIMEOUT = 30.0  # asyncio's ssl_shutdown_timeout default
_REFUSAL_LINGER = 2.0  # how long a server waits for a client it refused to close first
_EARLY_LIMIT = 256 * 1024  # bytes buffered from the peer while a handshake step runs
_RECV_SIZE = 256 * 1024  # bytes per read from the socket, as in asyncio (64 KiB: ~15% slower in bulk)
_READ_SIZE = 256 * 1024  # plaintext per data_received, at most

# _TLSStream states
_HANDSHAKE, _OPEN, _CLOSING, _REFUSED, _CLOSED = "handshake", "open", "closing", "refused", "closed"


def _fresh() -> None:
    """Empty this thread's OpenSSL error queue before an SSLObject call.
    OpenSSL tells "needs more bytes" from a failure by that queue
    (SSL_get_error), and CPython does not empty it first: an error some
    other code left on the loop's thread turns the next read that waits for
    the peer into an ``ssl.SSLError`` carrying that error.  pkcs11-provider
    1.0 leaves one ("General Error", its "Objects pool in inconsistent
    state") on whichever thread frees a certificate public key that OpenSSL
    had imported into it to compare with the card key: a garbage collection
    on the loop's thread, say (measured: it does so on Debian 12 and 13;
    on Debian 13 it failed 7 of 40 runs of tests/test_aio.py's
    20-connection echo)."""
    lib.ERR_clear_error()


def _handshake_step(ssl_object: _ssl.SSLObject) -> Callable[[], None]:
    def step() -> None:
        _fresh()
        ssl_object.do_handshake()

    return step


def _in_thread(
    loop: asyncio.AbstractEventLoop, step: Callable[[], object], release: Callable[[], None] | None = None
) -> asyncio.Future[None]:
    """Run ``step`` in a new thread that ends with it; the future settles on
    the loop, after ``release`` (called when the thread is done, even if
    nobody waits for it any more).  Not an executor: a pool's idle threads
    outlive connections, and a small pool queues handshakes behind a slow
    card's."""
    future: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if release is not None:
            release()
        if future.done():  # cancelled meanwhile (timeout, connection lost)
            return
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    def run() -> None:
        exc: BaseException | None = None
        try:
            step()
        except BaseException as e:
            exc = e
        with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
            loop.call_soon_threadsafe(settle, exc)

    try:
        threading.Thread(target=run, name="mtls_engine.aio handshake", daemon=True).start()
    except BaseException:  # no thread to be had
        if release is not None:
            release()
        raise
    return future


class _TLSStream(asyncio.BufferedProtocol, asyncio.Transport):
    """TLS over a TCP connection: the protocol of the TCP transport (``raw``)
    and, once the handshake is done, the transport of the application's
    protocol (``app``, a StreamReaderProtocol)."""

    _raw: asyncio.Transport  # set by connection_made

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: SSLContext,
        server_hostname: str | None,
        app: asyncio.Protocol,
        waiter: asyncio.Future[None] | None,
        timeout: float,
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        super().__init__()
        self._loop, self._app, self._waiter, self._timeout, self._gate = loop, app, waiter, timeout, gate
        self._server_side = waiter is None  # a client awaits its handshake, a server does not
        self._in, self._out = _ssl.MemoryBIO(), _ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, self._server_side, server_hostname)
        self._state = _HANDSHAKE
        self._connected = False  # the application's protocol has its connection_made
        self._buffer = memoryview(bytearray(_RECV_SIZE))  # what the TCP transport reads into
        self._early = bytearray()  # what the peer sent while a handshake step ran
        self._wakeup: asyncio.Future[None] | None = None  # the handshake waits for the peer
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._raw_eof = False  # the peer's FIN arrived (and went into the BIO once _in_eof)
        self._in_eof = False
        self._eof_delivered = False
        self._reading = True  # the application reads (pause_reading)
        self._app_paused = False  # we told the application to stop writing
        self._backlog: list[bytes] = []  # plaintext waiting for a TLS 1.2 renegotiation to finish
        self._ending: str | None = None  # after close_notify: "eof" (write_eof) or "close"
        self._notify_sent = self._fin_sent = False
        self._error: Exception | None = None  # why the connection failed, for the application

    # -- the handshake, step by step in threads ------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)
        self._timer = self._loop.call_later(self._timeout, self._timed_out)
        self._task = self._loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        try:
            while not await self._step():
                if not self._early and not self._raw_eof:
                    self._wakeup = self._loop.create_future()
                    await self._wakeup  # data_received, eof_received or connection_lost
        except asyncio.CancelledError:
            self._fail(ConnectionAbortedError("the TLS handshake was cancelled"))
            raise
        except Exception as exc:
            self._fail(exc)
        else:
            try:
                self._established()
            except Exception as exc:  # the application's connection_made raised
                context = {"message": "mtls_engine.aio: error in connection_made", "exception": exc, "transport": self}
                self._loop.call_exception_handler(context)
                self.abort()
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_exception(exc)

    async def _step(self) -> bool:
        """Feed the peer's bytes to OpenSSL, run one ``do_handshake()`` in a
        thread, send what it wrote (an alert too).  True when done."""
        self._feed()
        release = None
        if self._gate is not None:
            await self._gate.acquire()
            release = self._gate.release  # when the thread ends, not when we stop waiting for it
        try:
            await _in_thread(self._loop, _handshake_step(self._ssl), release)
            done = True
        except _ssl.SSLWantReadError:
            done = False
        except _ssl.SSLError:
            self._flush()
            raise
        if self._state != _HANDSHAKE:  # lost or timed out while the thread ran
            raise ConnectionAbortedError("the connection closed during the TLS handshake")
        self._flush()
        return done

    def _feed(self) -> None:
        """Move what the peer sent during a step into the incoming BIO (the
        loop's side of the handshake; no step is running)."""
        if self._early:
            self._in.write(self._early)
            self._early.clear()
            if not self._raw_eof:
                self._raw.resume_reading()
        if self._raw_eof and not self._in_eof:
            self._in_eof = True
            self._in.write_eof()

    def _wake(self, exc: Exception | None = None) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            if exc is None:
                self._wakeup.set_result(None)
            else:
                self._wakeup.set_exception(exc)

    def _timed_out(self) -> None:
        self._fail(ConnectionAbortedError(f"the TLS handshake took longer than {self._timeout} s: aborted"))

    def _fail(self, exc: BaseException) -> None:
        """The handshake failed: tell the awaiting coroutine, close the connection."""
        if self._state != _HANDSHAKE:
            return
        self._cancel_timer()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()  # the step in flight, if any, finishes in its thread unheeded
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_exception(exc)
        else:
            log.debug("TLS handshake with %s failed: %s", self._raw.get_extra_info("peername"), exc)
        if self._server_side and isinstance(exc, _ssl.SSLError) and not self._raw_eof and self._fin():
            # A refusal: the alert is out, then FIN; wait for the client to close, so
            # that its unread bytes cannot make the kernel reset the alert away.
            self._state = _REFUSED
            self._timer = self._loop.call_later(_REFUSAL_LINGER, self._raw.abort)
        else:
            self._state = _CLOSING
            if isinstance(exc, _ssl.SSLError):
                self._raw.close()  # after our alert
            else:
                self._raw.abort()

    def _established(self) -> None:
        self._cancel_timer()
        self._state, self._connected = _OPEN, True
        self._app.connection_made(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._feed()
        self._decrypt()  # records (or an alert) that came with the handshake's last flight

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the TCP transport's protocol ------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer  # the TCP transport receives into it (no allocation per read)

    def buffer_updated(self, nbytes: int) -> None:
        data = self._buffer[:nbytes]
        if self._state == _HANDSHAKE:
            self._early += data
            if len(self._early) > _EARLY_LIMIT:
                self._raw.pause_reading()  # resumed by _feed
            self._wake()
        elif self._state == _OPEN:
            self._in.write(data)
            self._decrypt()
        # refused, closing: discarded

    def eof_received(self) -> bool:
        self._raw_eof = True
        if self._state == _HANDSHAKE:
            self._wake()
        elif self._state == _REFUSED:
            return False  # the refused client closed: close too
        elif self._state == _OPEN:
            self._feed()
            self._decrypt()
        return True  # we close the TCP transport ourselves

    def connection_lost(self, exc: Exception | None) -> None:
        state, self._state = self._state, _CLOSED
        self._cancel_timer()
        if state == _HANDSHAKE:
            error = exc or ConnectionResetError("the peer closed the connection during the TLS handshake")
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(error)
            self._wake(error)
        elif self._connected:
            self._app.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        if self._state == _OPEN and not self._app_paused:
            self._app_paused = True
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app_paused:
            self._app_paused = False
            self._app.resume_writing()

    # -- records ---------------------------------------------------------------------

    def _decrypt(self) -> None:
        """Hand the application the plaintext of the records received while it
        reads: up to _READ_SIZE per data_received (one call per record would
        cost a loop iteration per 16 KiB), then the EOF."""
        more = True
        while more and self._state == _OPEN and self._reading and not self._eof_delivered:
            chunks: list[bytes] = []
            size, end, error = 0, False, None
            try:
                while size < _READ_SIZE:
                    _fresh()
                    chunk = self._ssl.read(_READ_SIZE - size)
                    if not chunk:  # close_notify
                        end = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            except _ssl.SSLWantReadError:
                pass
            except (_ssl.SSLZeroReturnError, _ssl.SSLEOFError):
                end = True  # close_notify, or a TCP EOF without one
            except _ssl.SSLError as exc:
                error = exc  # a bad record, the peer's alert
            more = size >= _READ_SIZE
            if chunks:
                self._app.data_received(b"".join(chunks))
            if error is not None:
                self._fatal(error)
                return
            if end and self._state == _OPEN:
                self._eof_delivered = True
                if not self._app.eof_received():
                    self.close()
        self._send()  # a renegotiation's answer, or a backlog it held up

    def _send(self) -> None:
        """Encrypt queued plaintext, then (when ending) close_notify and FIN/close."""
        while self._backlog and self._state in (_OPEN, _CLOSING):
            try:
                _fresh()
                self._ssl.write(self._backlog[0])
            except _ssl.SSLWantReadError:
                break  # a TLS 1.2 renegotiation: retried when the peer's records come
            except _ssl.SSLError as exc:
                self._fatal(exc)
                return
            del self._backlog[0]
        if self._ending is not None and not self._backlog and not self._notify_sent:
            self._notify_sent = True
            with contextlib.suppress(_ssl.SSLError):  # SSLWantReadError: we do not wait for the peer's
                _fresh()
                self._ssl.unwrap()
        self._flush()
        if self._notify_sent and self._ending == "close":
            self._raw.close()
        elif self._notify_sent and not self._fin_sent:
            self._fin_sent = True
            if not self._fin():
                self._raw.abort()

    def _fin(self) -> bool:
        """TCP FIN after what is buffered; False when the socket is gone."""
        try:
            self._raw.write_eof()
        except OSError:  # the peer reset the connection meanwhile
            return False
        return True

    def _flush(self) -> None:
        data = self._out.read()
        if data and not self._raw.is_closing():
            self._raw.write(data)

    def _fatal(self, exc: Exception) -> None:
        """A TLS error after the handshake (a bad record, the peer's alert)."""
        if self._state in (_OPEN, _CLOSING):
            self._error, self._state = exc, _CLOSING
            self._flush()  # our alert
            self._raw.close()  # connection_lost passes exc to the application

    # -- the application's transport ------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if self._ending == "eof":
            raise RuntimeError("cannot call write() after write_eof()")
        if self._state != _OPEN or not data:
            return  # after close() or a failure, as asyncio's TLS does
        self._backlog.append(bytes(data))
        self._send()

    def write_eof(self) -> None:
        """TLS half-close: close_notify, then TCP FIN; reading goes on."""
        if self._state == _OPEN and self._ending is None:
            self._ending = "eof"
            self._send()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._state != _OPEN:
            return
        self._state, self._ending = _CLOSING, "close"
        self._send()
        if not self._notify_sent:  # a renegotiation holds the backlog up: give it a while
            self._timer = self._loop.call_later(_SHUTDOWN_TIMEOUT, self._raw.abort)

    def abort(self) -> None:
        if self._state in (_OPEN, _CLOSING):
            self._state = _CLOSING
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._state != _OPEN

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._raw_eof:
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            if not self._raw_eof:
                self._raw.resume_reading()
            self._loop.call_soon(self._decrypt)  # records already in the BIO

    def is_reading(self) -> bool:
        return self._reading and self._state == _OPEN

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() + sum(map(len, self._backlog))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "compression":
            return self._ssl.compression()
        return self._raw.get_extra_info(name, default)  # peername, sockname, socket; no sslcontext


def _timeouts(kwargs: dict[str, Any]) -> float:
    """Take asyncio's TLS timeouts out of ``kwargs`` (the TCP calls refuse them)."""
    kwargs.pop("ssl_shutdown_timeout", None)
    timeout = kwargs.pop("ssl_handshake_timeout", None)
    return _HANDSHAKE_TIMEOUT if timeout is None else float(timeout)


async def open_connection(
    host: str | None = None,
    port: int | str | None = None,
    *,
    ssl: SSLContext,
    server_hostname: str | None = None,
    offload: bool = True,
    limit: int = _LIMIT,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection(host, port, ssl=ssl)`` whose TLS handshake
    (and so the card's signature) runs in a worker thread when ``offload``.
    ``server_hostname`` defaults to ``host`` ("" checks no name, as in
    asyncio); other keywords go to ``loop.create_connection``
    (``ssl_handshake_timeout`` too).  Raises the handshake's
    ``ssl.SSLError`` here."""
    if not offload:
        return await asyncio.open_connection(
            host, port, ssl=ssl, server_hostname=server_hostname, limit=limit, **kwargs
        )
    if server_hostname is None:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        server_hostname = host
    timeout = _timeouts(kwargs)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    waiter: asyncio.Future[None] = loop.create_future()
    # Made before connecting: an error here (a bad server_hostname) must not strand a socket.
    tls = _TLSStream(loop, ssl, server_hostname or None, protocol, waiter, timeout)
    address: dict[str, Any] = {"host": host, "port": port}  # (None with sock=...)
    raw, _ = await loop.create_connection(lambda: tls, **address, **kwargs)
    try:
        await waiter
    except BaseException:
        if not raw.is_closing():  # cancelled: give up the connection
            raw.abort()
        raise
    return reader, asyncio.StreamWriter(tls, protocol, reader, loop)


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | None = None,
    port: int | None = None,
    *,
    ssl: SSLContext,
    offload: bool = True,
    limit: int = _LIMIT,
    max_handshakes: int = 64,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server(client_connected_cb, host, port, ssl=ssl)``
    whose TLS handshakes (and so a card-held server key's signatures) run in
    worker threads when ``offload``, at most ``max_handshakes`` at once.
    ``client_connected_cb(reader, writer)`` runs on the loop after a
    successful handshake; a failed one only closes its connection.  Other
    keywords go to ``loop.create_server``."""
    if not offload:
        return await asyncio.start_server(client_connected_cb, host, port, ssl=ssl, limit=limit, **kwargs)
    timeout = _timeouts(kwargs)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_handshakes)

    def connection() -> _TLSStream:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)
        return _TLSStream(loop, ssl, None, protocol, None, timeout, gate)

    return await loop.create_server(connection, host, port, **kwargs)
