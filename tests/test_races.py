"""Races and a recursion in the set-up paths: what two threads do to one
context at once (cffi calls run without the GIL), and a UI that another
library wraps around mtls_engine's PIN prompt guard."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import mtls_engine
from mtls_engine import _server
from mtls_engine._context import ssl_ctx_pointer
from mtls_engine._lib import ffi, lib
from mtls_engine._softhsm import CA

from .conftest import need
from .servers import echo_server, talk

ROUNDS = 150
RULE, SCOPE, CARD = 1, 2, 4
NATIVE = Path(__file__).resolve().parent / "native" / "races.c"


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/native/races.c, compiled against this OpenSSL's headers."""
    cc = os.environ.get("CC") or shutil.which("cc")
    need(cc is not None and shutil.which(cc) is not None, "a C compiler (cc) builds tests/native/races.c")
    assert cc is not None
    flags: list[str] = []
    prefix = os.environ.get("MTLS_ENGINE_OPENSSL_PREFIX")
    if prefix:
        flags += [f"-I{prefix}/include", f"-L{prefix}/lib64", f"-L{prefix}/lib"]
    out = tmp_path_factory.mktemp("native") / "races.so"
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", *flags, str(NATIVE), "-o", str(out),
                           "-lcrypto", "-lpthread"], capture_output=True, text=True)  # fmt: skip
    # The extension was built against these headers: a failure is a bug here.
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("races")
    ca = CA.create("races test CA")
    (d / "ca.pem").write_bytes(ca.pem)
    cert, key = ca.issue_server_files(d, "localhost")
    ccert, ckey = ca.issue_client_files(d, "racing client")
    # Same CA and name, another key: passes every check but the pins.
    ocert, okey = ca.issue_server_files(tmp_path_factory.mktemp("races-other"), "localhost")
    return {"ca": d / "ca.pem", "cert": cert, "key": key, "ccert": ccert, "ckey": ckey, "ocert": ocert, "okey": okey}


def optional_server(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A server that asks for a client certificate and serves without one
    (it answers with the subject it got, "" for none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(str(ca))
    return ctx


@contextmanager
def often_switching() -> Iterator[None]:
    """Python switches threads every microsecond (the default is 5 ms), so
    a window between two statements is hit within a few rounds."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def at_once(*steps: Callable[[], None], stagger: float = 0.0) -> None:
    """Run each step on its own thread, all released together, the n-th
    ``n * stagger`` seconds after the first."""
    barrier = threading.Barrier(len(steps))
    errors: list[BaseException] = []

    def run(index: int, step: Callable[[], None]) -> None:
        try:
            barrier.wait()
            time.sleep(index * stagger)
            step()
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]


def test_concurrent_hook_installs_keep_every_hook(pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """present_only_to and pin_server on one context from several threads
    at once: both stay installed and enforced (before the fix a thread
    could write the flags it had read over those another thread wrote
    since, and the pins or the scope were no longer checked)."""
    flags = _server._Hooks.flags

    def then_switch(hooks: _server._Hooks) -> int:
        value: int = flags.fget(hooks)  # type: ignore[misc]
        # Other threads run here, for a while: the flags just read may be
        # stale by the time they are written.
        time.sleep(random.uniform(0, 0.001))
        return value

    monkeypatch.setattr(_server._Hooks, "flags", property(then_switch))
    pins = [mtls_engine.pin_of(pki_files["cert"])]
    lost: list[int] = []
    contexts = []
    with often_switching():
        for _ in range(ROUNDS):
            ctx = ssl.create_default_context(cafile=str(pki_files["ca"]))
            ctx.load_cert_chain(str(pki_files["ccert"]), str(pki_files["ckey"]))
            steps = [lambda c=ctx: _server.present_only_to(c, ["elsewhere.example"]),
                     lambda c=ctx: _server.pin_server(c, pins)]  # fmt: skip
            random.shuffle(steps)
            at_once(*steps, stagger=0.0003)
            state = lib.mtls_hooks_state(ssl_ctx_pointer(ctx))
            if state != RULE | SCOPE:
                lost.append(state)
            contexts.append(ctx)
    assert lost == [], f"{len(lost)} of {ROUNDS} contexts lost a hook (flags left: {sorted(set(lost))})"
    # What the handshakes obey: no certificate for localhost (not listed),
    # and a localhost server with another key than the pinned one refused.
    pinned = optional_server(pki_files["cert"], pki_files["key"], pki_files["ca"])
    other = optional_server(pki_files["ocert"], pki_files["okey"], pki_files["ca"])
    presented = unpinned = 0
    with echo_server(pinned) as good, echo_server(other) as bad:
        for ctx in contexts:
            presented += talk(ctx, good.port)["subject"] != ""
            try:
                talk(ctx, bad.port)
                unpinned += 1
            except ssl.SSLCertVerificationError:
                pass
    assert (presented, unpinned) == (0, 0)


def _address(obj: Any) -> ctypes.c_void_p:
    return ctypes.c_void_p(int(ffi.cast("uintptr_t", obj)))


def test_hooks_made_once_when_two_threads_race(native: Path) -> None:
    """Two threads entering the C side at the same moment (the peer hooks
    and a card on one new context): one set of hooks, with both settings
    (before the fix each could make its own, and one thread's was lost)."""
    races = ctypes.CDLL(str(native))
    races.race_hooks.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    n = 200
    contexts = [ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) for _ in range(n)]
    pointers = [ssl_ctx_pointer(c) for c in contexts]
    array = (ctypes.c_void_p * n)(*[_address(p).value for p in pointers])
    card = lib.mtls_card_new(0)  # never freed, as every card (a context may outlive it)
    failed = races.race_hooks(array, n, _address(ffi.addressof(lib, "mtls_install_peer_hooks")),
                              _address(ffi.addressof(lib, "mtls_attach_card")), _address(card))  # fmt: skip
    states = Counter(lib.mtls_hooks_state(p) for p in pointers)
    assert (failed, states) == (0, Counter({RULE | CARD: n}))
    assert all(c.options & ssl.OP_NO_RENEGOTIATION for c in contexts)


GUARD_WRAPPED = """
import ctypes, sys
from mtls_engine._lib import lib
ui = ctypes.CDLL(sys.argv[1])
assert lib.mtls_guard_pin_prompts() == 1   # a backend load installs the guard
assert ui.foreign_ui_install() == 1        # another library wraps the default UI: the guard
assert lib.mtls_guard_pin_prompts() == 1   # the next backend load
answer = ctypes.create_string_buffer(64)
result = ui.foreign_ui_prompt(b"a prompt that asks for no PIN", answer, 64)
print("result", result, "deepest", ui.foreign_ui_deepest(), "answer", answer.value.decode())
"""


def test_guard_and_a_foreign_ui_that_wraps_it(native: Path) -> None:
    """A UI that another library installed over the guard, wrapping it,
    becomes the guard's "previous" at the next backend load: a non-PIN
    prompt goes guard -> foreign UI -> guard -> OpenSSL's UI, once, instead
    of back and forth until the stack overflows (the foreign UI here stops
    at 64 nested calls and fails the prompt)."""
    proc = subprocess.run([sys.executable, "-c", GUARD_WRAPPED, str(native)], input="typed phrase\n",
                          capture_output=True, text=True, timeout=60, start_new_session=True)  # fmt: skip
    # start_new_session: no terminal, so OpenSSL's UI reads the answer from stdin
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["result", "0", "deepest", "1", "answer", "typed", "phrase"]
    assert "a prompt that asks for no PIN" in proc.stderr
