"""The C boundary: the SSL_CTX pointer behind an SSLContext is accepted only
when it is that context's own (not merely one configured the same way), and
OpenSSL's error queue is left empty wherever mtls_engine says it is; a
backend that asks for a PIN is offered the verified PIN once per key load."""

from __future__ import annotations

import gc
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import mtls_engine
from mtls_engine import _context
from mtls_engine._context import ssl_ctx_pointer
from mtls_engine._lib import consume_errors, ffi, lib
from mtls_engine._softhsm import KeyKind

from .conftest import Pki
from .helpers import run_python

# -- the SSL_CTX pointer ---------------------------------------------------------


class _ForeignCandidate:
    """The binding, except that the SSL_CTX it finds behind any object is
    ``foreign``: what a wrong offset landing on another context would give."""

    def __init__(self, foreign: Any) -> None:
        self._foreign = foreign

    def __getattr__(self, name: str) -> Any:
        return getattr(lib, name)

    def mtls_ctx_candidate(self, address: int, offset: int) -> Any:
        return self._foreign


def test_a_real_but_foreign_ssl_ctx_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two contexts made the same way agree on options and verify mode, so
    only a change made through Python tells them apart: the validation must
    make one and watch it through the pointer."""
    mine, other = ssl.create_default_context(), ssl.create_default_context()
    foreign = ssl_ctx_pointer(other)
    # What a static comparison sees: nothing tells the two apart.
    assert int(lib.SSL_CTX_get_options(foreign)) == int(mine.options)
    assert lib.SSL_CTX_get_verify_mode(foreign) == lib.SSL_VERIFY_PEER | lib.SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    assert mine.verify_mode == ssl.CERT_REQUIRED
    monkeypatch.setattr(_context, "lib", _ForeignCandidate(foreign))
    with pytest.raises(mtls_engine.InterpreterSslError, match=r"a change of SSLContext\.options was not seen"):
        ssl_ctx_pointer(mine)
    assert mine.options == other.options  # both left as they were
    monkeypatch.undo()
    assert ssl_ctx_pointer(mine) != foreign


class _RecordingContext(ssl.SSLContext):
    """An SSLContext that records every value assigned to ``options``."""

    writes: list[int]

    @property  # type: ignore[override]
    def options(self) -> ssl.Options:
        return ssl.SSLContext.options.__get__(self)

    @options.setter
    def options(self, value: int) -> None:
        self.__dict__.setdefault("writes", []).append(int(value))
        ssl.SSLContext.options.__set__(self, value)


def test_validation_flips_an_option_through_python_and_restores_it() -> None:
    ctx = _RecordingContext(ssl.PROTOCOL_TLS_CLIENT)
    before = int(ctx.options)
    ssl_ctx_pointer(ctx)
    assert ctx.writes == [before ^ ssl.OP_NO_TICKET, before]
    assert int(ctx.options) == before


# -- OpenSSL's error queue ---------------------------------------------------------

# Puts ``n`` errors (ERR_LIB_USER, reasons 1..n) on this thread's queue, as
# other code sharing this libcrypto would (ERR_raise; ERR_put_error before 3.0).
PUSH_ERRORS = """
import ctypes
from mtls_engine._lib import ffi, lib
_crypto = ctypes.CDLL(ffi.string(lib.mtls_library_of(lib.mtls_own_symbol(b"OpenSSL_version_num"))).decode())


def push_errors(n):
    for reason in range(1, n + 1):
        if hasattr(_crypto, "ERR_new"):
            _crypto.ERR_new()
            _crypto.ERR_set_error.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
            _crypto.ERR_set_error(128, reason, b"left by other code")
        else:
            _crypto.ERR_put_error(128, 0, reason, b"test", 0)
"""


def _push_errors(n: int) -> None:
    space: dict[str, Any] = {}
    exec(PUSH_ERRORS, space)
    space["push_errors"](n)


def _drain_by_hand() -> list[str]:
    """The queue's entries, read one by one here (independent of consume_errors)."""
    out, buf = [], ffi.new("char[512]")
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buf, len(buf))
        out.append(ffi.string(buf).decode())
    return out


def test_consume_errors_takes_every_error() -> None:
    space: dict[str, Any] = {}
    exec(PUSH_ERRORS, space)
    push_errors = space["push_errors"]
    # A provider card-key context left by an earlier test and freed by the
    # garbage collector between the steps below may leave pkcs11-provider's
    # "General Error" (1.0: freeing a key it imported) on this thread's
    # queue: collect first, and not during the test.
    gc.collect()
    gc.disable()
    try:
        lib.ERR_clear_error()
        push_errors(5)
        expected = _drain_by_hand()
        assert len(expected) == 5 and len(set(expected)) == 5
        push_errors(5)
        assert consume_errors() == expected  # all of them, oldest first
        assert lib.ERR_peek_error() == 0
        assert consume_errors() == []
    finally:
        gc.enable()


FAILED_LOAD = (
    PUSH_ERRORS
    + """
import json, os, ssl
import mtls_engine

def no_pin(token):
    push_errors(3)  # a PIN dialog that used OpenSSL, then gave up
    return None

out = {}
try:
    mtls_engine.load_card_key(ssl.create_default_context(), os.environ["T_URI"], module=os.environ["T_MODULE"],
                              pin=no_pin)
except mtls_engine.Error as exc:
    out["error"] = type(exc).__name__
out["left"] = lib.ERR_peek_error()
print(json.dumps(out))
"""
)


def test_a_failed_load_card_key_leaves_the_error_queue_empty(pki: Pki) -> None:
    proc = run_python(FAILED_LOAD, {"T_URI": pki.key_uri(KeyKind.P256, pki.pintest), "T_MODULE": pki.module})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"error": "PinRequired", "left": 0}


FORK = (
    PUSH_ERRORS
    + """
import json, os
import mtls_engine
mtls_engine.load_card_key  # loads the card-key machinery (on first use), and with it the fork hook

lib.ERR_clear_error()
push_errors(3)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, str(lib.ERR_peek_error()).encode())
    os._exit(0)
os.close(w)
child = int(os.read(r, 100))
os.waitpid(pid, 0)
print(json.dumps({"child": child, "parent": lib.ERR_peek_error() != 0}))
"""
)


def test_the_fork_hook_leaves_the_childs_error_queue_empty() -> None:
    """A child starts with a copy of the forking thread's queue; the fork
    hook (mtls_engine/_backends.py, _after_fork) empties it."""
    proc = run_python(FORK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"child": 0, "parent": True}


# -- the verified PIN, offered once per key load -------------------------------------


def _store_load(uri: bytes, pin: bytes | None) -> tuple[bool, int, list[str]]:
    """mtls_store_load_private_key (csrc/helper.c) with ``pin`` as the
    verified PIN on offer, taking the first key: (found, keys, errors)."""
    count = ffi.new("int *")
    buf = ffi.NULL if pin is None else ffi.new("char[]", pin)
    lib.ERR_clear_error()
    pkey = lib.mtls_store_load_private_key(ffi.NULL, uri, buf, len(pin or b""), 1, count)
    found = pkey != ffi.NULL
    if found:
        lib.EVP_PKEY_free(pkey)
    return found, int(count[0]), consume_errors()


def test_the_verified_pin_is_offered_once_per_key_load(tmp_path: Path) -> None:
    """A key load's store asks through mtls_engine's PIN UI (csrc/helper.c,
    mtls_pin_offer); it gets the verified PIN for its first question and
    nothing after.  Here the store is OpenSSL's own file store, which asks
    once per encrypted key, through the same UI a PKCS#11 backend uses."""
    secret = b"verified-elsewhere-1"
    enc = serialization.BestAvailableEncryption(secret)

    def keys(n: int) -> bytes:
        return b"".join(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
            )
            for _ in range(n)
        )

    (tmp_path / "one.pem").write_bytes(keys(1))
    (tmp_path / "two.pem").write_bytes(keys(2))
    one, two = (f"file:{tmp_path / name}".encode() for name in ("one.pem", "two.pem"))
    assert _store_load(one, secret) == (True, 1, [])  # the offer reaches the store
    assert _store_load(one, None)[:2] == (False, 0)  # no PIN on offer: nothing answers
    found, count, errors = _store_load(two, secret)
    assert (found, count) == (True, 1)  # the second key's question got no answer
    assert any("UI" in e for e in errors), errors
