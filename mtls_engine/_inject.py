"""``inject`` / ``extract``: make the client contexts that libraries create
for themselves (``ssl.create_default_context``, urllib3, httpx, aiohttp, …)
carry the card key — the way truststore injects a trust store — and undo it.

Scoped by design: a client certificate tells every server that asks who the
card-holder is, and the card signs that server's handshake.  So ``inject``
requires ``present_to``, the host names the card may be shown to (as
browsers auto-select a certificate only for listed sites); any other server
that asks gets no certificate.

Only contexts made for clients (``PROTOCOL_TLS_CLIENT``, which every
``create_default_context`` and current urllib3/httpx/aiohttp use) get the
card; a server context never does.  ``extract`` restores ``ssl.SSLContext``
and makes every context that got the card during the injection present it
to nobody from then on, so the injection leaves nothing behind.
"""

from __future__ import annotations

import os
import ssl
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ._api import CardKey, LoadedKey, attach, resolve_card_key
from ._errors import ConfigError
from ._fork import ForkSafeLock
from ._pin import PinArg
from ._server import present_only_to

__all__ = ["extract", "inject", "injected"]

_lock = ForkSafeLock()
_original: type[ssl.SSLContext] = ssl.SSLContext
_loaded: LoadedKey | None = None
_present: Iterable[str] | Callable[[str], bool] | None = None
_carriers: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
_patched_modules: list[tuple[Any, str, Any]] = []
_original_create_default_context = ssl.create_default_context


# ssl.SSLContext's setters call super(SSLContext, SSLContext), looking the
# name up in the ssl module at call time: once ssl.SSLContext is the
# subclass below, that would find the subclass and recurse.  So the
# subclass sets these attributes on the C base type itself.
_BASE: Any = _original.__mro__[1]  # _ssl._SSLContext


def _direct(name: str, wrap: Callable[[Any], Any]) -> property:
    def get(self: ssl.SSLContext) -> Any:
        return wrap(getattr(_BASE, name).__get__(self))

    def set_(self: ssl.SSLContext, value: Any) -> None:
        if name == "minimum_version" and value == ssl.TLSVersion.SSLv3:
            self.options &= ~ssl.Options.OP_NO_SSLv3
        getattr(_BASE, name).__set__(self, value)

    return property(get, set_)


def _msg_callback_get(self: ssl.SSLContext) -> Any:
    inner = _BASE._msg_callback.__get__(self)
    return getattr(inner, "user_function", inner)


def _msg_callback_set(self: ssl.SSLContext, callback: Any) -> None:
    """Set a message callback the way ssl.SSLContext does: the callback gets
    the ssl module's enums where the values are known."""
    if callback is None:
        _BASE._msg_callback.__set__(self, None)
        return
    if not callable(callback):
        raise TypeError(f"{callback} is not callable.")
    enums: Any = ssl

    def inner(conn: Any, direction: Any, version: Any, content_type: Any, msg_type: Any, data: Any) -> Any:
        def as_enum(enum: Any, value: Any) -> Any:
            try:
                return enum(value)
            except ValueError:
                return value

        version = as_enum(ssl.TLSVersion, version)
        content_type = as_enum(enums._TLSContentType, content_type)
        if content_type == enums._TLSContentType.HEADER:
            msg_type = as_enum(enums._TLSContentType, msg_type)
        elif content_type == enums._TLSContentType.ALERT:
            msg_type = as_enum(enums._TLSAlertType, msg_type)
        else:
            msg_type = as_enum(enums._TLSMessageType, msg_type)
        return callback(conn, direction, version, content_type, msg_type, data)

    inner.user_function = callback  # type: ignore[attr-defined]
    _BASE._msg_callback.__set__(self, inner)


class _CardContext(ssl.SSLContext):
    """``ssl.SSLContext`` while injected: a client context gets the card."""

    options = _direct("options", ssl.Options)
    verify_flags = _direct("verify_flags", ssl.VerifyFlags)
    verify_mode = _direct("verify_mode", ssl.VerifyMode)
    minimum_version = _direct("minimum_version", ssl.TLSVersion)
    maximum_version = _direct("maximum_version", ssl.TLSVersion)
    _msg_callback = property(_msg_callback_get, _msg_callback_set)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        loaded, present = _loaded, _present
        if loaded is None or present is None or self.protocol != ssl.PROTOCOL_TLS_CLIENT:
            return
        attach(self, loaded, present_to=present)
        _carriers.add(self)


def _card_default_context(purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, **kwargs: Any) -> ssl.SSLContext:
    """ssl.create_default_context while injected.  Before 3.10 it makes a
    generic PROTOCOL_TLS context (client or server is decided later), which
    _CardContext leaves alone; a context made for SERVER_AUTH is a client's."""
    ctx = _original_create_default_context(purpose, **kwargs)
    loaded, present = _loaded, _present
    if purpose == ssl.Purpose.SERVER_AUTH and loaded is not None and present is not None and ctx not in _carriers:
        attach(ctx, loaded, present_to=present)
        _carriers.add(ctx)
    return ctx


def _patch_library_references() -> None:
    """Modules that did ``from ssl import SSLContext`` keep the class they
    imported; point those already loaded at the injected one."""
    for name, attr in (("urllib3.util.ssl_", "SSLContext"), ("urllib3.connection", "SSLContext")):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, attr, None) is _original:
            _patched_modules.append((mod, attr, _original))
            setattr(mod, attr, _CardContext)
    # requests >= 2.32 builds one default client context at import time
    adapters = sys.modules.get("requests.adapters")
    preloaded = getattr(adapters, "_preloaded_ssl_context", None)
    if isinstance(preloaded, ssl.SSLContext) and _loaded is not None and _present is not None:
        attach(preloaded, _loaded, present_to=_present)
        _carriers.add(preloaded)


def inject(
    key: str,
    *,
    present_to: Iterable[str] | Callable[[str], bool],
    cert: str | os.PathLike[str] | None = None,
    module: str | os.PathLike[str] | None = None,
    pin: PinArg = None,
    backend: str = "auto",
    force: bool = False,
) -> CardKey:
    """From now on, every client ``SSLContext`` created in this process
    carries the card key, presented only to the servers ``present_to``
    names (host names, ``*.example.org``, or a callable ``(host) -> bool``).
    The card is found, logged in to and loaded once, here; errors are
    raised here.  Returns what was loaded."""
    global _loaded, _present
    if not callable(present_to):
        present_to = list(present_to) if not isinstance(present_to, (str, bytes)) else present_to
        if not present_to:
            raise ConfigError(
                "present_to= is empty: name the servers the card may be shown to (e.g. ['api.example.org'])"
            )
    with _lock:
        if _loaded is not None:
            raise ConfigError("a card key is already injected; call mtls_engine.extract() first")
        loaded = resolve_card_key(key, cert, module, pin, backend, force=force)
        # Check present_to on a throwaway context before touching ssl itself.
        present_only_to(_original(ssl.PROTOCOL_TLS_CLIENT), present_to)
        _loaded, _present = loaded, present_to
        ssl.SSLContext = _CardContext  # type: ignore[misc]
        ssl.create_default_context = _card_default_context
        _patch_library_references()
    return loaded.info


def extract() -> None:
    """Undo ``inject``: new contexts are plain again, and the contexts that
    got the card while it was injected present it to nobody any more."""
    global _loaded, _present
    with _lock:
        if _loaded is None:
            return
        ssl.SSLContext = _original  # type: ignore[misc]
        ssl.create_default_context = _original_create_default_context
        for mod, attr, value in _patched_modules:
            setattr(mod, attr, value)
        _patched_modules.clear()
        for ctx in list(_carriers):
            present_only_to(ctx, lambda host: False)
        _carriers.clear()
        _loaded = _present = None


def injected() -> bool:
    return _loaded is not None
