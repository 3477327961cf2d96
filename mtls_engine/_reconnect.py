"""A token that goes away and comes back.

A network HSM behind ``p11-kit server``, a card pulled from its reader: the
card key's signatures fail from that moment, and neither backend gets them
back by itself.  p11-kit-client.so closes a connection that failed and
answers every later call with CKR_DEVICE_ERROR until its caller finalises
and re-initialises it; libp11 (0.4.12, 0.4.13) and pkcs11-provider 1.0
re-initialise their module only after a fork (and libp11 0.4.13 would wait
for ever for a session: csrc/helper.c, C_GetFunctionList).  So mtls_engine
does it:

- C callbacks on every context that holds a card key notice a failed
  signature (this side sends a fatal alert while signing its
  CertificateVerify or ServerKeyExchange) and mark the card lost, at no
  cost to handshakes that succeed.
- The next handshake, before it signs anything, calls :meth:`Card.recover`
  (from the certificate callback): first a test signature with the key it
  has (a false alarm costs one signature and nothing else); if that fails
  too, it re-opens the module, finds the same token (same serial) by the
  key's URI, logs in again through the PIN source the key was loaded with
  (under the same guard as the first login: flags checked first, a PIN the
  token rejected is never offered again), finds the key, loads it through
  a new backend instance, checks it against the certificate, and from then
  on every context with this card signs with the new key.  No context is
  recreated and no one is asked for anything new.
- While the token is away, handshakes fail at once: a handshake that
  needed the card raises :class:`TokenUnavailable` (an ``ssl.SSLError``
  and an ``mtls_engine.Error``) saying why and what happens next.
  Attempts to reconnect are at most one per :data:`RETRY_INTERVAL`.
- A PIN problem during a reconnection (rejected, locked, final try, no PIN
  source) stops the automatic attempts: :func:`reconnect` tries again when
  the user says so.
- In a forked child whose module could not log in again (see _fork), every
  card of that module is stopped the same way before any handshake: a
  backend must not reach a token mtls_engine could not log in to
  (pkcs11-provider logs in by itself on a pinpad reader, which needs no
  PIN from anyone: the reader would ask its user at every signature).
"""

from __future__ import annotations

import itertools
import math
import os
import ssl
import time
import weakref
from collections.abc import Callable

from . import _backends
from ._errors import (
    CertKeyMismatch,
    ConfigError,
    Error,
    OpenSSLError,
    PinError,
    Pkcs11Error,
    TokenNotFound,
    TokenUnavailable,
)
from ._fork import ForkSafeLock, in_child
from ._lib import consume_errors, ffi, lib, text
from ._log import log
from ._p11 import KeyObject, Module, TokenInfo
from ._pin import MEMORY
from ._secret import wipe
from ._uri import ParsedUri

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["RETRY_INTERVAL", "Card", "reconnect"]


# The least time between two attempts to reach a lost token from handshakes
# (reconnect() is not limited).  Short, because an attempt against a token
# that is still away costs little (p11-kit-client: a refused connect) and
# the first handshake after the token is back should find it.
RETRY_INTERVAL = 0.2

# Cards by id, for the C callbacks.  Weak: a card lives as long as a context
# or a LoadedKey holds it, and then lets go of its PIN source.
_CARDS: weakref.WeakValueDictionary[int, Card] = weakref.WeakValueDictionary()
_IDS = itertools.count(1)
_BY_CONTEXT: weakref.WeakKeyDictionary[ssl.SSLContext, Card] = weakref.WeakKeyDictionary()
_LOCK = ForkSafeLock()


class Card:
    """One card key loaded through a backend: what it takes to find it again
    (module, key URI, token serial, PIN source, backend), and its state."""

    def __init__(
        self,
        *,
        module: Module,
        key_uri: ParsedUri,
        token: TokenInfo,
        key: KeyObject,
        leaf: Any,
        backend: str,
        get_pin: Callable[[TokenInfo], bytearray | None],
        force: bool,
        pkey: Any,
    ) -> None:
        self.module_path = module.path
        self.key_uri = key_uri
        self.token = token
        self.key = key
        self.leaf = leaf  # X509 *, to check a reloaded key against
        self.backend = backend
        self._get_pin = get_pin
        self._force = force
        # The key loaded with the context (which holds it too); after a
        # reconnection the card holds the current one in C.  Connections
        # hold their own reference to the key they started with, and a
        # retired backend instance is freed once no key of it is left.
        self._first_key = pkey
        self._lock = ForkSafeLock()
        self._last_attempt = -math.inf
        self._confirmed = False  # a test signature failed too: the token is really gone
        self.last_error: Error | None = None
        self.stopped: Error | None = None  # set by a PIN problem: no automatic attempts
        self.stopped_in_child = False  # stopped because a forked child could not log in again
        self.reconnections = 0
        with _LOCK:
            self.id = next(_IDS)
            c = lib.mtls_card_new(self.id)
            if c == ffi.NULL:
                raise OpenSSLError("cannot allocate the card state", consume_errors())
            self.c = c  # never freed: contexts may outlive this object
            _CARDS[self.id] = self

    # -- state -------------------------------------------------------------

    def _state(self, lost: int = -1) -> tuple[bool, int, int]:
        err = ffi.new("unsigned long *")
        state = int(lib.mtls_card_state(self.c, lost, err))
        return bool(state & 1), state >> 1, int(err[0])

    @property
    def lost(self) -> bool:
        return self._state()[0]

    @property
    def failures(self) -> int:
        """Handshakes this card failed so far (its signature, or reaching it)."""
        return self._state()[1]

    def _current_key(self) -> Any:
        pkey = lib.mtls_card_key(self.c)
        if pkey == ffi.NULL:
            return self._first_key
        return ffi.gc(pkey, lib.EVP_PKEY_free)

    def attach(self, ctx: ssl.SSLContext, ssl_ctx: Any) -> None:
        """Watch this card on ``ctx`` (C callbacks; named errors)."""
        if not lib.mtls_attach_card(ssl_ctx, self.c):
            raise OpenSSLError("cannot install the card's callbacks", consume_errors())
        with _LOCK:
            _BY_CONTEXT[ctx] = self
        _name_errors(ctx)

    # -- reaching the token again ------------------------------------------

    def recover(self) -> bool:
        """Called from a handshake (the certificate callback) while the card
        is marked lost: True when it can sign again.  Never raises."""
        with self._lock:
            if not self.lost:
                return True  # another handshake got there first
            if self.stopped is not None:
                return False
            now = time.monotonic()
            if now - self._last_attempt < RETRY_INTERVAL:
                return False
            self._last_attempt = now
            try:
                if not self._confirm():
                    log.info("the card key %r on %s signs again without reconnecting", self.key.label, self.token)
                    return True
                self._reload()
                return True
            except PinError as exc:
                self.last_error = self.stopped = exc
                log.error("mtls_engine stopped reconnecting to %s: %s", self.token, exc)
            except Error as exc:
                self.last_error = exc
                if self.stopped is exc:
                    log.error("mtls_engine stopped reconnecting to %s: %s", self.token, exc)
                else:
                    log.info("%s is still unreachable: %s", self.token, exc)
            except Exception as exc:  # a PIN callback, say: never let it escape into OpenSSL
                self.last_error = Error(f"reconnecting to {self.token} failed: {type(exc).__name__}: {exc}")
                log.exception("reconnecting to %s failed", self.token)
            finally:
                consume_errors()
            return False

    def explains_failure(self) -> bool:
        """Whether this card is why the handshake that just failed on this
        thread failed (the C callbacks noted that it failed it)."""
        taken = int(lib.mtls_card_take_failure(self.c))
        if not taken:
            return False
        with self._lock:
            if int(lib.mtls_card_generation(self.c)) != taken - 1:
                return True  # it was lost, and is back already
            if not self.lost:
                return False  # a false alarm, cleared meanwhile
            return self.stopped is not None or self._confirm()

    def stop_in_child(self, cause: Exception) -> None:
        """In a forked child that could not log in to the token again: no
        handshake signs with this card until :func:`reconnect` succeeds."""
        error = cause if isinstance(cause, Error) else Error(f"{type(cause).__name__}: {cause}")
        with self._lock:
            self.last_error = self.stopped = error
            self.stopped_in_child = self._confirmed = True
            self._state(lost=1)

    def _confirm(self) -> bool:
        """With the lock held, the card marked lost: is the token really
        gone?  One test signature decides, once per loss; a false alarm
        (the signature works: the handshake failed for another reason)
        clears the mark."""
        if self._confirmed:
            return True
        if self._probe():
            self._state(lost=0)
            return False
        self._confirmed = True
        return True

    def reconnect(self) -> None:
        """Reach the token again now, whatever state the card is in; raises
        the named error when that fails."""
        with self._lock:
            self._last_attempt = time.monotonic()
            try:
                self._reload()
            except Error as exc:
                self.last_error = exc
                raise
            finally:
                consume_errors()

    def _probe(self) -> bool:
        """One test signature with the key the card signs with now."""
        ok = _sign_test(self._current_key())
        consume_errors()
        return ok

    def _reload(self) -> None:
        """Re-open, find the same token, log in, find the key, load it
        through a new backend instance, check it; then sign with it."""
        started = time.monotonic()
        mod = Module.load(self.module_path)
        mod.reopen()
        token = mod.find_token(self.key_uri)
        if token.serial != self.token.serial:
            raise TokenNotFound(
                f"the token that matches {self.key_uri.safe!r} now is {token}, not {self.token} that the key "
                "was loaded from; mtls_engine reconnects only to that same token (serial number). Put that "
                "token back, or load the key again"
            )
        pin = mod.login(token, self._get_pin, pin_memory=MEMORY, allow_final_try=self._force)
        try:
            key = mod.find_private_key(token, self.key_uri)
            pkey = _backends.load_private_key(self.backend, mod, token, key, pin, fresh=True)
        finally:
            wipe(pin)
        matches = bool(lib.X509_check_private_key(self.leaf, pkey))
        consume_errors()
        if matches and not _sign_test(pkey):
            # Reaching the token again did not help: trying again would only
            # load more backend instances.  Stop, as for a PIN problem.
            self.stopped = Pkcs11Error(
                f"mtls_engine reconnected to {token} and found the key {key.label!r} again, but it still "
                f"cannot sign ({'; '.join(consume_errors()) or 'no detail'}). Check the key on the token "
                "(its CKA_SIGN, its mechanisms)"
            )
            raise self.stopped
        if not matches:
            raise CertKeyMismatch(
                f"the key {key.label!r} (id {key.id.hex()}) found on {token} after reconnecting does not "
                "belong to the certificate the context presents; the token's key was replaced. Load the "
                "key and its certificate again"
            )
        if not lib.mtls_card_set_key(self.c, pkey):
            raise OpenSSLError("cannot switch the card to the reloaded key", consume_errors())
        del pkey  # the card holds it now
        _backends.release_unused()  # the instances this card (or another) no longer needs
        self.token, self.key = token, key
        self.stopped = self.last_error = None
        self._confirmed = self.stopped_in_child = False
        self.reconnections += 1
        log.warning(
            "reconnected to %s: logged in again and reloaded the key %r through a new %s instance (%.0f ms)",
            token, key.label, self.backend, (time.monotonic() - started) * 1000,
        )  # fmt: skip

    # -- what a failed handshake tells the user ----------------------------

    def unavailable(self, cause: ssl.SSLError) -> TokenUnavailable:
        """The named error for a handshake that failed with ``cause``
        because of this card."""
        lost, _, err = self._state()
        module = os.path.basename(self.module_path)
        if not lost:
            message = (
                f"the card key {self.key.label!r} on {self.token} could not sign this handshake: the token "
                "was unreachable, and mtls_engine has reconnected to it since; try the connection again"
            )
        elif self.stopped is not None and self.stopped_in_child:
            message = (
                f"the card key {self.key.label!r} on {self.token} cannot sign in this forked process: logging "
                f"in to the token again after the fork failed ({type(self.stopped).__name__}: {self.stopped}), "
                "and mtls_engine does not try again by itself. Fix that, then call mtls_engine.reconnect(ctx)"
            )
        elif self.stopped is not None:
            message = (
                f"the card key {self.key.label!r} on {self.token} cannot sign: the token was lost and "
                f"mtls_engine stopped reconnecting to it ({type(self.stopped).__name__}: {self.stopped}). "
                "Fix that, then call mtls_engine.reconnect(ctx)"
            )
        elif self.last_error is not None and self.lost:
            message = (
                f"the card key {self.key.label!r} on {self.token} cannot sign: the token is still unreachable "
                f"({type(self.last_error).__name__}: {self.last_error}). mtls_engine tries again at the next "
                "handshake; bring the token back (its reader, its HSM, or the p11-kit server)"
            )
        else:
            detail = _error_text(err) if err else str(cause)
            message = (
                f"the card key {self.key.label!r} on {self.token} could not sign this handshake, nor a test "
                f"signature after it (module {module}: {detail}): the token is unreachable, was removed, or "
                "no longer knows the key. mtls_engine reconnects to it at the next handshake (new sessions, a "
                "new login through the same PIN source, the key found again by its URI); bring the token back "
                "(its reader, its HSM, or the p11-kit server)"
            )
        return TokenUnavailable(message)


def _sign_test(pkey: Any) -> bool:
    """One SHA-256 test signature (ECDSA, or RSA PKCS#1 v1.5: what any card
    key can make), errors left on the queue for the caller."""
    tbs = b"mtls_engine: is the card still there?"
    sig = ffi.new("unsigned char[]", 1024)
    siglen = ffi.new("size_t *", 1024)
    lib.ERR_clear_error()
    return bool(lib.mtls_test_sign(pkey, b"SHA256", 0, tbs, len(tbs), sig, siglen))


def _error_text(code: int) -> str:
    buf = ffi.new("char[512]")
    lib.ERR_error_string_n(code, buf, len(buf))
    return text(buf)


@ffi.def_extern(error=0)  # type: ignore[untyped-decorator]
def mtls_py_recover(card_id: int) -> int:
    card = _CARDS.get(card_id)
    return 1 if card is not None and card.recover() else 0


def _stop_cards_not_logged_in() -> None:
    """In a forked child, after _backends' step logged the modules in
    again: stop every card whose module could not."""
    modules = {mod.path: mod for mod in list(Module._cache.values())}
    for card in list(_CARDS.values()):
        mod = modules.get(card.module_path)
        if mod is not None and mod.fork_error is not None:
            card.stop_in_child(mod.fork_error)


# Registered after _backends' step (imported above), so it runs after it.
in_child("stopping card keys whose token did not log in again", _stop_cards_not_logged_in)


def card_of(ctx: ssl.SSLContext) -> Card | None:
    with _LOCK:
        return _BY_CONTEXT.get(ctx)


def reconnect(ctx: ssl.SSLContext) -> None:
    """Reach the token of ``ctx``'s card key again now: re-open the module,
    log in again through the PIN source the key was loaded with, find the
    key by its URI and sign with it from the next handshake on.  Automatic
    after a lost token (at the next handshake); call this after fixing what
    stopped it (a PIN problem), or to wait for a token before serving.
    Raises the named error when the token cannot be reached."""
    card = card_of(ctx)
    if card is None:
        raise ConfigError("this context holds no card key loaded by mtls_engine; nothing to reconnect")
    card.reconnect()


# -- named errors from ssl's own handshakes --------------------------------


class _NamedErrors:
    """Mixed into the context's SSLSocket / SSLObject classes: a handshake
    that failed because the card could not sign raises TokenUnavailable
    instead of OpenSSL's bare "[SSL] EVP lib"; the C callbacks note that
    failure, so a handshake that succeeds does nothing more here.  And every
    handshake step and read starts with this thread's OpenSSL error queue
    empty: OpenSSL tells "needs more bytes" or the peer's close_notify from
    a failure by that queue, CPython does not empty it first, and
    pkcs11-provider 1.0 leaves an error on whichever thread frees a
    certificate key it imported for a comparison with the card key
    (mtls_engine/aio.py, _fresh)."""

    __slots__ = ()

    def read(self, *args: Any, **kwargs: Any) -> Any:
        _clear_errors()
        return super().read(*args, **kwargs)  # type: ignore[misc]

    def do_handshake(self, *args: Any, **kwargs: Any) -> Any:
        _clear_errors()
        try:
            return super().do_handshake(*args, **kwargs)  # type: ignore[misc]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLCertVerificationError):
            raise
        except ssl.SSLError as exc:
            card = card_of(self.context)  # type: ignore[attr-defined]
            if card is not None and card.explains_failure():
                raise card.unavailable(exc) from exc
            raise


_clear_errors = lib.ERR_clear_error


_CLASSES: dict[type, type] = {}


def _with_named_errors(base: type) -> type:
    if issubclass(base, _NamedErrors):
        return base
    with _LOCK:
        cls = _CLASSES.get(base)
        if cls is None:
            cls = _CLASSES[base] = type(base.__name__, (_NamedErrors, base), {"__module__": __name__})
        return cls


def _name_errors(ctx: ssl.SSLContext) -> None:
    """Make ``ctx``'s wrap_socket / wrap_bio return the classes above (the
    documented per-instance ``sslsocket_class`` / ``sslobject_class``)."""
    ctx.sslsocket_class = _with_named_errors(ctx.sslsocket_class)
    ctx.sslobject_class = _with_named_errors(ctx.sslobject_class)
