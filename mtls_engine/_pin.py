"""Where a PIN comes from, and the memory of PINs a token already rejected.

A PIN is held as bytes only as long as the login needs it.  A rejected PIN
is remembered as a keyed hash (key random per process), so the same wrong
PIN is never sent to the same card twice, whoever asks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import urllib.parse
from collections.abc import Callable
from typing import Union

from ._errors import PinError
from ._p11 import TokenInfo
from ._uri import ParsedUri

PinArg = Union[str, bytes, Callable[[TokenInfo], Union[str, bytes, None]], None]


class PinMemory:
    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._rejected: set[bytes] = set()
        self._lock = threading.Lock()

    def _digest(self, token: TokenInfo, pin: bytes) -> bytes:
        ident = "\x00".join((token.manufacturer, token.model, token.serial, token.label)).encode()
        return hmac.new(self._key, ident + b"\x00" + pin, hashlib.sha256).digest()

    def rejected(self, token: TokenInfo, pin: bytes) -> bool:
        with self._lock:
            return self._digest(token, pin) in self._rejected

    def remember(self, token: TokenInfo, pin: bytes) -> None:
        with self._lock:
            self._rejected.add(self._digest(token, pin))


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
