"""Where a PIN comes from, and the memory of PINs a token already rejected.

Every copy of a PIN that mtls_engine makes is a ``bytearray``, read
straight into it (a ``file:`` or ``env:`` source, a URI's ``pin-value``) and
wiped once the login and the backend's key load are done; C calls are given
a pointer into it, not a copy.  A rejected PIN is remembered only as a keyed
hash (key random per process), so the same wrong PIN is never sent to the
same card twice, whoever asks; so is the PIN that logged a token in: a
forked child logs in again only with that PIN.

What lives on: the *source* of the PIN.  The module's login record keeps the
``pin=`` argument (or the URI carrying ``pin-value``) for the life of the
process, because a forked child and a reconnection after the token was lost
must log in again.  So ``pin="1234"`` keeps that str (which Python cannot
wipe) in memory until the process ends, and so does a URI with
``pin-value``; ``pin_source("env:VAR")`` or ``pin_source("file:PATH")`` keeps
only the variable's name or the path, and reads the PIN again each time it
is needed.  A PIN typed at a prompt passes through one str from ``getpass``
that cannot be wiped.  Core dumps of a card-holding process are stopped with
:func:`mtls_engine.protect_process`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys
import urllib.parse
from collections.abc import Callable

from ._errors import PinError, PinRequired
from ._fork import ForkSafeLock
from ._p11 import TokenInfo
from ._secret import utf8_into, wipe
from ._uri import ParsedUri

TYPE_CHECKING = False  # typing is never imported at run time (import cost)
if TYPE_CHECKING:
    from typing import Union

    PinArg = Union[str, bytes, Callable[[TokenInfo], Union[str, bytes, bytearray, None]], None]
    Pin = Union[bytes, bytearray]
else:
    PinArg = "str | bytes | Callable[[TokenInfo], str | bytes | bytearray | None] | None"  # only annotations name it
    Pin = "bytes | bytearray"

_PIN_FILE_MAX = 4096
_BLANK = frozenset(b" \t\r\n")


class PinMemory:
    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._rejected: set[bytes] = set()
        self._accepted: dict[bytes, bytes] = {}  # token digest -> PIN digest
        self._lock = ForkSafeLock()

    def _digest(self, token: TokenInfo, pin: Pin) -> bytes:
        ident = "\x00".join((token.manufacturer, token.model, token.serial, token.label)).encode()
        h = hmac.new(self._key, digestmod=hashlib.sha256)
        # In pieces: no ``ident + pin`` copy of the PIN is made.
        h.update(ident)
        h.update(b"\x00")
        h.update(pin)
        return h.digest()

    def rejected(self, token: TokenInfo, pin: Pin) -> bool:
        with self._lock:
            return self._digest(token, pin) in self._rejected

    def remember(self, token: TokenInfo, pin: Pin) -> None:
        with self._lock:
            self._rejected.add(self._digest(token, pin))

    def accepted(self, token: TokenInfo, pin: Pin) -> None:
        """``pin`` logged ``token`` in."""
        with self._lock:
            self._accepted[self._digest(token, b"")] = self._digest(token, pin)

    def compare_accepted(self, token: TokenInfo, pin: Pin) -> bool | None:
        """Whether ``pin`` is the PIN that logged ``token`` in before (None:
        no PIN did, in this process or the one it was forked from)."""
        with self._lock:
            good = self._accepted.get(self._digest(token, b""))
            return None if good is None else hmac.compare_digest(good, self._digest(token, pin))


MEMORY = PinMemory()


def _as_pin(pin: str | bytes | bytearray) -> bytearray:
    return utf8_into(pin) if isinstance(pin, str) else bytearray(pin)


def _read_pin_file(path: str, origin: str) -> bytearray:
    """The PIN on the file's first line (a final newline, CRLF too, is not
    part of it).  A file with more lines that are not blank is refused
    before any login: which line is the PIN would be a guess, and a wrong
    guess costs a try."""
    buf = bytearray(_PIN_FILE_MAX + 1)
    try:
        with open(path, "rb", buffering=0) as f, memoryview(buf) as view:
            n = 0
            while n < len(buf):
                got = f.readinto(view[n:])
                if not got:
                    break
                n += got
    except OSError as exc:
        wipe(buf)
        raise PinError(f"cannot read the PIN file named by {origin} ({path}): {exc.strerror}") from None
    try:
        if n > _PIN_FILE_MAX:
            raise PinError(
                f"the PIN file named by {origin} ({path}) is larger than {_PIN_FILE_MAX} bytes; it must hold "
                "the PIN on its first line and nothing else"
            )
        eol = buf.find(b"\n", 0, n)
        end = n if eol < 0 else eol
        if end > 0 and buf[end - 1] == 0x0D:
            end -= 1
        rest = range(n if eol < 0 else eol + 1, n)
        if any(buf[i] not in _BLANK for i in rest):
            raise PinError(
                f"the PIN file named by {origin} ({path}) has more than one line; it must hold the PIN on "
                "its first line only (mtls_engine did not log in: which line is the PIN would be a guess)"
            )
        if end == 0:
            raise PinError(f"the PIN file named by {origin} ({path}) is empty")
        with memoryview(buf) as view:
            return bytearray(view[:end])
    finally:
        wipe(buf)


def _read_pin_env(var: str) -> bytearray:
    value: str | bytes | None
    if os.supports_bytes_environ:
        value = os.environb.get(var.encode())  # the environment's own bytes: no new copy
    else:
        value = os.environ.get(var)
    if value is None:
        raise PinRequired(f"the environment variable {var} (from env:{var}) is not set; set it to the PIN")
    if not value:
        raise PinRequired(f"the environment variable {var} (from env:{var}) is empty; set it to the PIN")
    return _as_pin(value)


def prompt_pin(token: TokenInfo) -> bytearray:
    """Ask for the PIN on the terminal, without echo.  Never guesses: with
    no terminal (a service, a pipe, CI) it raises PinRequired instead."""
    if not (sys.stdin is not None and sys.stdin.isatty()):
        raise PinRequired(
            f"{token} needs a PIN and there is no terminal to ask on; give it with "
            "--pin-source env:VAR or file:PATH (Python: pin=mtls_engine.pin_source(...))"
        )
    import getpass  # only here (import cost)

    pin = getpass.getpass(f"PIN for {token}: ")
    if not pin:
        raise PinRequired(f"no PIN was entered for {token}")
    return utf8_into(pin)


class _Source:
    """A PIN source as a callable ``pin=``: read when (and only when) a login
    needs it.  Its repr names the source, never the PIN."""

    def __init__(self, spec: str, read: Callable[[TokenInfo], bytearray]) -> None:
        self.spec = spec
        self._read = read

    def __call__(self, token: TokenInfo) -> bytearray:
        return self._read(token)

    def __repr__(self) -> str:
        return f"pin_source({self.spec!r})"


def pin_source(spec: str) -> Callable[[TokenInfo], bytearray]:
    """A ``pin=`` callable from a PIN source: ``env:VAR`` (an environment
    variable), ``file:PATH`` (a file's first line; more lines are refused)
    or ``prompt`` (ask on the terminal).  It keeps no PIN: each call reads
    the source again into a new bytearray.  A PIN itself is never accepted
    here, so it cannot end up in a process's argument list."""
    if not isinstance(spec, str):
        raise PinError(f"a PIN source is a str such as 'env:VAR' or 'file:PATH', not {type(spec).__name__}")
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "prompt" and not rest:
        return _Source("prompt", prompt_pin)
    if sep and kind == "env" and rest:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rest):
            raise PinError(f"env:{rest} does not name an environment variable; use env:NAME")
        return _Source(spec, lambda token: _read_pin_env(rest))
    if sep and kind == "file" and rest:
        path = urllib.parse.unquote(urllib.parse.urlsplit(spec).path) if rest.startswith("//") else rest
        return _Source(spec, lambda token: _read_pin_file(path, spec))
    raise PinError(
        f"unknown PIN source {_describe_spec(spec)}; use env:VAR, file:PATH or prompt "
        "(a PIN itself is never accepted here)"
    )


def _describe_spec(spec: str) -> str:
    """Name a bad PIN source without echoing it: it may be a PIN typed by mistake."""
    kind, sep, _ = spec.partition(":")
    if sep and kind.isalpha() and len(kind) <= 16:
        return f"of kind {kind!r}"
    return f"({len(spec)} characters, not shown in case it is a PIN)"


class PinGetter:
    """The PIN for a token, from ``pin=`` or else from a URI's ``pin-value``
    / ``pin-source`` (see :func:`pin_getter`), each time as a new bytearray
    for the caller to :func:`wipe`.  Its repr shows no PIN."""

    def __init__(self, pin: PinArg, uris: tuple[ParsedUri, ...]) -> None:
        self._pin = pin
        self._uris = uris

    def __repr__(self) -> str:
        return "<PinGetter>"

    def given(self) -> bytearray | None:
        """The PIN when it was given as a value (``pin=`` a str or bytes, or
        the URI's ``pin-value``): known without calling, prompting or reading
        anything; a new bytearray to wipe.  None for a callable, a PIN source
        or no PIN."""
        if isinstance(self._pin, (str, bytes)):
            return _as_pin(self._pin)
        if self._pin is not None:
            return None
        for u in self._uris:
            value = u.pin_value_bytes()
            if value is not None:
                return value
            if u.pin_source is not None:
                return None
        return None

    def __call__(self, token: TokenInfo) -> bytearray | None:
        pin = self._pin
        if isinstance(pin, (str, bytes)):
            return _as_pin(pin)
        if isinstance(pin, _Source) or pin is prompt_pin:
            return pin(token)  # already a new bytearray of its own
        if callable(pin):
            got = pin(token)
            if got is None:
                return None
            if not isinstance(got, (str, bytes, bytearray)):
                raise PinError(f"the PIN callback returned {type(got).__name__}; return a str, bytes or None")
            return _as_pin(got)
        for u in self._uris:
            value = u.pin_value_bytes()
            if value is not None:
                return value
            source = u.pin_source
            if source is not None:
                if source.startswith("file:"):
                    path = urllib.parse.unquote(urllib.parse.urlsplit(source).path)
                else:
                    path = source
                return _read_pin_file(path, "the URI's pin-source")
        return None


def pin_getter(pin: PinArg, *uris: ParsedUri) -> PinGetter:
    """A function giving the PIN for a token, from ``pin`` or else from a
    URI's ``pin-value`` / ``pin-source``, as a new bytearray for the caller
    to :func:`wipe`.  Giving a PIN in two places is an error: it is never
    clear which one the user meant."""
    sources = []
    if pin is not None:
        sources.append("pin=")
    for u in uris:
        if u.has_pin_value:
            sources.append("the URI's pin-value")
        if u.pin_source is not None:
            sources.append("the URI's pin-source")
    if len(sources) > 1:
        raise PinError(f"the PIN is given twice ({' and '.join(sources)}); give it once")
    if pin is not None and not (isinstance(pin, (str, bytes)) or callable(pin)):
        raise PinError(f"pin= must be a str, bytes or a callable, not {type(pin).__name__}")
    return PinGetter(pin, uris)
