"""Where a PIN comes from, and the memory of PINs a token already rejected.

A PIN is held as bytes only as long as the login needs it.  A rejected PIN
is remembered as a keyed hash (key random per process), so the same wrong
PIN is never sent to the same card twice, whoever asks.  So is the PIN that
logged a token in: a forked child logs in again only with that PIN.
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
from ._uri import ParsedUri

TYPE_CHECKING = False  # typing is never imported at run time (import cost)
if TYPE_CHECKING:
    from typing import Union

    PinArg = Union[str, bytes, Callable[[TokenInfo], Union[str, bytes, None]], None]
else:
    PinArg = "str | bytes | Callable[[TokenInfo], str | bytes | None] | None"  # only annotations name it


class PinMemory:
    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._rejected: set[bytes] = set()
        self._accepted: dict[bytes, bytes] = {}  # token digest -> PIN digest
        self._lock = ForkSafeLock()

    def _digest(self, token: TokenInfo, pin: bytes) -> bytes:
        ident = "\x00".join((token.manufacturer, token.model, token.serial, token.label)).encode()
        return hmac.new(self._key, ident + b"\x00" + pin, hashlib.sha256).digest()

    def rejected(self, token: TokenInfo, pin: bytes) -> bool:
        with self._lock:
            return self._digest(token, pin) in self._rejected

    def remember(self, token: TokenInfo, pin: bytes) -> None:
        with self._lock:
            self._rejected.add(self._digest(token, pin))

    def accepted(self, token: TokenInfo, pin: bytes) -> None:
        """``pin`` logged ``token`` in."""
        with self._lock:
            self._accepted[self._digest(token, b"")] = self._digest(token, pin)

    def compare_accepted(self, token: TokenInfo, pin: bytes) -> bool | None:
        """Whether ``pin`` is the PIN that logged ``token`` in before (None:
        no PIN did, in this process or the one it was forked from)."""
        with self._lock:
            good = self._accepted.get(self._digest(token, b""))
            return None if good is None else hmac.compare_digest(good, self._digest(token, pin))


MEMORY = PinMemory()


def _as_bytes(pin: str | bytes) -> bytes:
    return pin.encode("utf-8") if isinstance(pin, str) else bytes(pin)


def _read_pin_file(path: str, origin: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as exc:
        raise PinError(f"cannot read the PIN file named by {origin} ({path}): {exc.strerror}") from None
    pin = data.rstrip(b"\r\n")
    if not pin:
        raise PinError(f"the PIN file named by {origin} ({path}) is empty")
    return pin


def _read_pin_env(var: str) -> bytes:
    value = os.environ.get(var)
    if value is None:
        raise PinRequired(f"the environment variable {var} (from env:{var}) is not set; set it to the PIN")
    if not value:
        raise PinRequired(f"the environment variable {var} (from env:{var}) is empty; set it to the PIN")
    return value.encode("utf-8")


def prompt_pin(token: TokenInfo) -> bytes:
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
    return pin.encode("utf-8")


class _Source:
    """A PIN source as a callable ``pin=``: read when (and only when) a login
    needs it.  Its repr names the source, never the PIN."""

    def __init__(self, spec: str, read: Callable[[TokenInfo], bytes]) -> None:
        self.spec = spec
        self._read = read

    def __call__(self, token: TokenInfo) -> bytes:
        return self._read(token)

    def __repr__(self) -> str:
        return f"pin_source({self.spec!r})"


def pin_source(spec: str) -> Callable[[TokenInfo], bytes]:
    """A ``pin=`` callable from a PIN source: ``env:VAR`` (an environment
    variable), ``file:PATH`` (a file's first line) or ``prompt`` (ask on the
    terminal).  A PIN itself is never accepted here, so it cannot end up in
    a process's argument list."""
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


def pin_getter(pin: PinArg, *uris: ParsedUri) -> Callable[[TokenInfo], bytes | None]:
    """A function giving the PIN for a token, from ``pin`` or else from a
    URI's ``pin-value`` / ``pin-source``.  Giving a PIN in two places is an
    error: it is never clear which one the user meant."""
    sources = []
    if pin is not None:
        sources.append("pin=")
    for u in uris:
        if u.pin_value is not None:
            sources.append("the URI's pin-value")
        if u.pin_source is not None:
            sources.append("the URI's pin-source")
    if len(sources) > 1:
        raise PinError(f"the PIN is given twice ({' and '.join(sources)}); give it once")
    if pin is not None and not (isinstance(pin, (str, bytes)) or callable(pin)):
        raise PinError(f"pin= must be a str, bytes or a callable, not {type(pin).__name__}")

    def get(token: TokenInfo) -> bytes | None:
        if isinstance(pin, (str, bytes)):
            return _as_bytes(pin)
        if callable(pin):
            got = pin(token)
            if got is None:
                return None
            if not isinstance(got, (str, bytes)):
                raise PinError(f"the PIN callback returned {type(got).__name__}; return a str, bytes or None")
            return _as_bytes(got)
        for u in uris:
            if u.pin_value is not None:
                return _as_bytes(u.pin_value)
            source = u.pin_source
            if source is not None:
                if source.startswith("file:"):
                    path = urllib.parse.unquote(urllib.parse.urlsplit(source).path)
                else:
                    path = source
                return _read_pin_file(path, "the URI's pin-source")
        return None

    return get
