"""One token-loss scenario, run in a fresh interpreter by test_token_loss.py
(pkcs11-provider serves one module per process, and a process that exits
is the crash check).  Reads its setting from T_* environment variables and
prints one JSON line of measurements.

Scenarios (T_SCENARIO):
  client   handshakes before, while and after the p11-kit server is away
  threads  the same with 4 client threads handshaking all along
  pin      the PIN source yields a wrong PIN at the reconnection
  server   the *server's* key is on the token that goes away
  many     T_RECONNECTIONS forced reconnections (mtls_engine.reconnect), a
           handshake after each, with what stays loaded measured after
           T_WARMUP of them and at the end; then the server goes away and
           comes back
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mtls_engine
from mtls_engine._reconnect import card_of

from .p11kit import P11KitServer
from .servers import EchoServer

RECOVERY_WAIT = 10.0  # seconds the scenario waits at most for a reconnection

log_lines: list[str] = []


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log_lines.append(f"{record.levelname} {record.getMessage()}")


def _outcome(fn: Callable[[], None]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        fn()
        return {"ok": True, "seconds": time.monotonic() - started, "at": started}
    except Exception as exc:
        return {
            "ok": False,
            "seconds": time.monotonic() - started,
            "at": started,
            "cls": type(exc).__name__,
            "named": isinstance(exc, mtls_engine.Error),
            "ssl_error": isinstance(exc, ssl.SSLError),
            "message": str(exc),
        }


def _client_handshake(ctx: ssl.SSLContext, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping")
            if tls.recv(64) != b"ping":
                raise AssertionError("no echo")


def _asyncio_handshake(ctx: ssl.SSLContext, port: int) -> None:
    """The same through asyncio's own TLS (SSLObject, wrap_bio)."""

    async def talk() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(b"ping")
        if await reader.read(64) != b"ping":
            raise AssertionError("no echo")
        writer.close()

    asyncio.run(talk())


class _Echo(EchoServer):
    """A TLS echo server on loopback that records every handshake's
    outcome (the exception class, for a server whose key is on the token)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.outcomes: list[dict[str, Any]] = []
        super().__init__(ctx)

    def _serve(self) -> None:
        for tls in self.accepted():

            def serve(tls: ssl.SSLSocket = tls) -> None:
                tls.do_handshake()
                tls.sendall(tls.recv(64))

            self.outcomes.append(_outcome(serve))
            tls.close()


def _server(env: dict[str, str]) -> P11KitServer:
    return P11KitServer(
        socket=Path(env["T_SOCKET"]),
        provider=env["T_SOFTHSM"],
        token_uri=env["T_TOKEN_URI"],
        env={"SOFTHSM2_CONF": env["T_SOFTHSM2_CONF"]},
    )


def _until_ok(
    attempt: Callable[[], dict[str, Any]], wait: float = RECOVERY_WAIT, pause: float = 0.02
) -> tuple[float | None, list[dict[str, Any]]]:
    """Try until one attempt works: (seconds until then or None, the failures)."""
    started = time.monotonic()
    failures = []
    while time.monotonic() - started < wait:
        got = attempt()
        if got["ok"]:
            return time.monotonic() - started, failures
        failures.append(got)
        time.sleep(pause)
    return None, failures


def main() -> None:
    env = dict(os.environ)
    logging.getLogger("mtls_engine").addHandler(_Collect())
    logging.getLogger("mtls_engine").setLevel(logging.INFO)
    scenario = env["T_SCENARIO"]
    token = _server(env)
    os.environ["P11_KIT_SERVER_ADDRESS"] = token.address
    out: dict[str, Any] = {"scenario": scenario}
    token.start()
    try:
        if scenario == "server":
            _server_scenario(env, token, out)
        elif scenario == "many":
            _many_scenario(env, token, out)
        else:
            _client_scenario(env, token, out, scenario)
    finally:
        token.stop()
    out["log"] = log_lines
    print(json.dumps(out))


def _client_scenario(env: dict[str, str], token: P11KitServer, out: dict[str, Any], scenario: str) -> None:
    pin_calls = []
    wrong = {"on": False}

    def pin(info: mtls_engine.TokenInfo) -> str:
        pin_calls.append(info.label)
        return "00000000" if wrong["on"] else env["T_PIN"]

    srv = _Echo(mtls_engine.server_context(env["T_SERVER_CERT"], env["T_SERVER_KEY"], env["T_CA"]))
    ctx = mtls_engine.client_context(env["T_KEY"], cafile=env["T_CA"], module=env["T_CLIENT"], pin=pin,
                                     backend=env["T_BACKEND"])  # fmt: skip
    card = card_of(ctx)
    assert card is not None
    out["context"] = id(ctx)

    def hs() -> dict[str, Any]:
        return _outcome(lambda: _client_handshake(ctx, srv.port))

    stop_threads = threading.Event()
    threaded: list[dict[str, Any]] = []
    workers = []
    if scenario == "threads":

        def work() -> None:
            while not stop_threads.is_set():
                threaded.append(hs())

        workers = [threading.Thread(target=work) for _ in range(4)]
        for w in workers:
            w.start()

    out["before"] = [hs() for _ in range(3)]
    time.sleep(0.3 if scenario == "threads" else 0)
    token.stop()
    out["stopped_at"] = time.monotonic()
    out["lost"] = []
    for _ in range(6):
        out["lost"].append(hs())
        time.sleep(0.05)
    out["lost_asyncio"] = _outcome(lambda: _asyncio_handshake(ctx, srv.port))
    if scenario == "pin":
        wrong["on"] = True  # from now on the PIN source yields a wrong PIN
    token.start()
    out["started_at"] = time.monotonic()
    # With a wrong PIN it never recovers: 1.5 s shows that, and that it stays quiet.
    out["recovered_after"], out["while_starting"] = _until_ok(hs, 1.5 if scenario == "pin" else RECOVERY_WAIT)
    if scenario == "pin":
        out["pin_calls_after_rejection"] = len(pin_calls)
        out["more"] = [hs() for _ in range(3)]
        out["pin_calls_later"] = len(pin_calls)
        out["reconnect_wrong"] = _outcome(lambda: mtls_engine.reconnect(ctx))
        out["pin_calls_reconnect"] = len(pin_calls)
        wrong["on"] = False
        out["reconnect_right"] = _outcome(lambda: mtls_engine.reconnect(ctx))
    out["after"] = [hs() for _ in range(5)]
    out["after_asyncio"] = _outcome(lambda: _asyncio_handshake(ctx, srv.port))
    if scenario == "threads":
        time.sleep(0.5)
        stop_threads.set()
        for w in workers:
            w.join(60)
        out["threaded"] = threaded
    out["reconnections"] = card.reconnections
    out["pin_calls"] = len(pin_calls)
    out["same_context"] = card_of(ctx) is card
    out["server_errors"] = [o for o in srv.outcomes if not o["ok"]][:3]


def _server_scenario(env: dict[str, str], token: P11KitServer, out: dict[str, Any]) -> None:
    srv_ctx = mtls_engine.server_context(env["T_TOKEN_SERVER_CERT"], env["T_KEY"], env["T_CA"], module=env["T_CLIENT"],
                                         pin=mtls_engine.pin_source("env:T_PIN"), backend=env["T_BACKEND"])  # fmt: skip
    srv = _Echo(srv_ctx)
    client = ssl.create_default_context(cafile=env["T_CA"])
    client.load_cert_chain(env["T_CLIENT_CERT"], env["T_CLIENT_KEY"])

    def hs() -> dict[str, Any]:
        got = _outcome(lambda: _client_handshake(client, srv.port))
        time.sleep(0.02)  # the server records its side
        got["server"] = srv.outcomes[-1] if srv.outcomes else None
        return got

    out["before"] = [hs() for _ in range(3)]
    token.stop()
    out["lost"] = [hs() for _ in range(4)]
    token.start()
    out["recovered_after"], out["while_starting"] = _until_ok(hs)
    out["after"] = [hs() for _ in range(3)]
    card = card_of(srv_ctx)
    out["reconnections"] = card.reconnections if card is not None else None


def _loaded(token: P11KitServer) -> dict[str, Any]:
    """What a process keeps per backend instance: resident memory (after
    a collection and malloc_trim), engine libraries mapped (libp11's
    pkcs11.so and its private copies), engine instances alive and wrapper
    slots taken (csrc/helper.c), pkcs11-provider instances, open descriptors, and the server's p11-kit-remote processes
    (one per client connection)."""
    from mtls_engine._backends import ENGINE, PROVIDER, engine_path
    from mtls_engine._lib import ffi, lib

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    engine = engine_path()
    name = os.path.basename(engine) if engine else "pkcs11.so"
    mapped = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5].strip().removesuffix(" (deleted)")) == name:
                mapped.add(fields[5].strip())
    engines = set(m for m in mapped if "ossl-modules" not in m)  # pkcs11-provider's file has the same name
    slots = ffi.new("int[4]")
    alive = lib.mtls_p11_slots(slots, slots + 1, slots + 2, slots + 3)
    remotes = 0
    if token.proc is not None:
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid != str(token.proc.pid):
                try:
                    if os.getpgid(int(pid)) == token.proc.pid:
                        remotes += 1
                except OSError:
                    pass
    return {
        "rss": rss,
        "engine_files_mapped": len(engines),
        "engines_alive": alive,
        "engine_instances": ENGINE.release_unused(),
        "engine_libraries": ENGINE.libraries(),
        "slots_in_use": slots[0],
        "slots_handed": slots[1],
        "unwrapped": slots[2],
        "recycled": slots[3],
        "provider_instances": PROVIDER.instances(),
        "fds": len(os.listdir("/proc/self/fd")),
        "server_connections": remotes,
    }


def _many_scenario(env: dict[str, str], token: P11KitServer, out: dict[str, Any]) -> None:
    srv = _Echo(mtls_engine.server_context(env["T_SERVER_CERT"], env["T_SERVER_KEY"], env["T_CA"]))
    ctx = mtls_engine.client_context(env["T_KEY"], cafile=env["T_CA"], module=env["T_CLIENT"],
                                     pin=mtls_engine.pin_source("env:T_PIN"), backend=env["T_BACKEND"])  # fmt: skip
    card = card_of(ctx)
    assert card is not None

    def hs() -> dict[str, Any]:
        return _outcome(lambda: _client_handshake(ctx, srv.port))

    total, warmup = int(env["T_RECONNECTIONS"]), int(env["T_WARMUP"])
    out["before"] = hs()
    failed: list[dict[str, Any]] = []
    started = time.monotonic()
    for i in range(total):
        if i == warmup:
            out["at_warmup"] = _loaded(token)
        got = _outcome(lambda: mtls_engine.reconnect(ctx))
        if got["ok"]:
            got = hs()
        if not got["ok"]:
            failed.append({**got, "round": i})
    out["seconds_per_reconnection"] = (time.monotonic() - started) / max(total, 1)
    out["at_end"] = _loaded(token)
    out["failed"] = failed[:5]
    out["reconnections"] = card.reconnections
    token.stop()
    out["lost"] = [hs() for _ in range(3)]
    token.start()
    out["recovered_after"], out["while_starting"] = _until_ok(hs)
    out["after"] = [hs() for _ in range(3)]


if __name__ == "__main__":
    main()
