"""Application servers with an mtls_engine server context: the supported
way to hand each one an ``ssl.SSLContext``, checked at start-up, and the
client's certificate where the server gives the app none.

- uvicorn (>= 0.47): :func:`uvicorn_config` returns a ``uvicorn.Config``
  whose ``ssl_context_factory`` returns the context and whose HTTP protocol
  (uvicorn's ``http=`` setting, h11) puts the ASGI TLS extension
  (``scope["extensions"]["tls"]``) into every request's scope.
- hypercorn: :func:`hypercorn_config` returns a ``hypercorn.config.Config``
  whose ``create_ssl_context`` returns the context (with hypercorn's ALPN
  protocols).  Hypercorn gives the app no certificate (see docs/servers.md).
- gunicorn (>= 21): :func:`gunicorn_ssl_context` makes the ``ssl_context``
  server hook of a configuration file, :func:`gunicorn_on_starting` checks
  at start-up that gunicorn serves TLS with it; the WSGI environ's
  ``gunicorn.socket`` is the TLS socket.
- aiohttp.web takes the context as it is (``ssl_context=``); a request's
  ``transport.get_extra_info("ssl_object")`` is the TLS connection.

Nothing here is imported by ``import mtls_engine``; each server is imported
only by the function that needs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._errors import ClientAuthNotRequired, ConfigError, Error
from ._identity import client_identity, require_client_auth

__all__ = [
    "gunicorn_on_starting",
    "gunicorn_ssl_context",
    "hypercorn_config",
    "reload_crls",
    "reload_crls_on_sighup",
    "tls_extension",
    "uvicorn_config",
]

log = logging.getLogger("mtls_engine.server")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_SUITE_IDS: dict[str, int] = {}


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension (``scope["extensions"]["tls"]``) of a finished
    handshake: ``client_cert_chain`` (PEM, the client's own first),
    ``client_cert_name`` (RFC 4514), ``tls_version`` and ``cipher_suite``
    (numbers); ``server_cert`` is None (the ssl module does not give it)."""
    unverified = getattr(ssl_object, "get_unverified_chain", None)  # Python 3.13+: DER bytes, the client's first
    ders: list[bytes] = [bytes(c) for c in (unverified() or [])] if unverified is not None else []
    if not ders:
        leaf = ssl_object.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    chain = [ssl.DER_cert_to_PEM_cert(d) for d in ders]
    cipher = ssl_object.cipher()
    suite = None
    if cipher is not None:
        if cipher[0] not in _SUITE_IDS:  # OpenSSL's name -> the IANA number, learnt once per name
            _SUITE_IDS.update({c["name"]: int(c["id"]) & 0xFFFF for c in ssl_object.context.get_ciphers()})
        suite = _SUITE_IDS.get(cipher[0])
    version = ssl_object.version()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": client_identity(ders[0], san=False)["subject"] if ders else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(version or ""),
        "cipher_suite": suite,
    }


def _with_tls(app: ASGIApp, tls: dict[str, Any]) -> ASGIApp:
    """``app`` with ``tls`` as the TLS extension of every HTTP and WebSocket scope."""

    async def app_with_tls(scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
        await app(scope, receive, send)

    return app_with_tls


_UVICORN_TLS_OPTIONS = ("ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_cert_reqs", "ssl_ca_certs",
                        "ssl_ciphers", "ssl_version", "ssl_context_factory", "http")  # fmt: skip


def uvicorn_config(app: Any, ssl_context: ssl.SSLContext, **settings: Any) -> Any:
    """A loaded ``uvicorn.Config`` for ``app`` (with ``settings``: host,
    port, ...) serving TLS with ``ssl_context``, every request's scope
    carrying the TLS extension.  Raises ClientAuthNotRequired when the
    context uvicorn will use does not require a client certificate, and
    ConfigError for uvicorn's own TLS settings (they would build another
    context)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    given = [name for name in _UVICORN_TLS_OPTIONS if name in settings]
    if given:
        raise ConfigError(
            f"uvicorn_config() sets uvicorn's TLS itself; drop {', '.join(given)} (the mtls_engine context "
            "holds the server key, the client CAs and the CRLs)"
        )
    require_client_auth(ssl_context, "the SSLContext given to uvicorn_config()")

    class TLSExtensionProtocol(H11Protocol):
        """uvicorn's h11 protocol, each connection's app seeing the TLS extension."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            tls = transport.get_extra_info("ssl_object")
            if tls is not None:  # asyncio calls connection_made after the handshake
                self.app = _with_tls(self.app, tls_extension(tls))

    config = uvicorn.Config(
        app, ssl_context_factory=lambda config, default_factory: ssl_context, http=TLSExtensionProtocol, **settings
    )
    config.load()
    require_client_auth(config.ssl, "the SSLContext uvicorn will serve with")
    return config


def hypercorn_config(ssl_context: ssl.SSLContext, **settings: Any) -> Any:
    """A ``hypercorn.config.Config`` (``settings``: bind, alpn_protocols, ...)
    serving TLS with ``ssl_context`` (HTTP/2 and HTTP/1.1 offered by ALPN,
    as hypercorn's own context does).  Raises ClientAuthNotRequired when
    the context does not require a client certificate, and ConfigError for
    hypercorn's own TLS settings (they would build another context)."""
    from hypercorn.config import Config

    given = [n for n in ("certfile", "keyfile", "ca_certs", "verify_mode", "verify_flags", "ciphers") if n in settings]
    if given:
        raise ConfigError(
            f"hypercorn_config() sets hypercorn's TLS itself; drop {', '.join(given)} (the mtls_engine context "
            "holds the server key, the client CAs and the CRLs)"
        )
    require_client_auth(ssl_context, "the SSLContext given to hypercorn_config()")

    class CardConfig(Config):
        @property
        def ssl_enabled(self) -> bool:
            return True

        def create_ssl_context(self) -> ssl.SSLContext:
            ssl_context.set_alpn_protocols(self.alpn_protocols)
            return require_client_auth(ssl_context, "the SSLContext hypercorn will serve with")

    config = CardConfig()
    for name, value in settings.items():
        if not hasattr(config, name):
            raise ConfigError(f"hypercorn's Config has no setting {name!r}")
        setattr(config, name, value)
    return config


def gunicorn_ssl_context(ssl_context: ssl.SSLContext) -> Callable[[Any, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """gunicorn's ``ssl_context`` server hook (set it in the configuration
    file: ``ssl_context = gunicorn_ssl_context(ctx)``) returning ``ctx``
    for every connection.  Raises ClientAuthNotRequired at once (while
    gunicorn reads its configuration) when ``ctx`` does not require a
    client certificate."""
    require_client_auth(ssl_context, "the SSLContext given to gunicorn_ssl_context()")

    def ssl_context_hook(config: Any, default_ssl_context_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ssl_context

    ssl_context_hook.mtls_engine_context = ssl_context  # type: ignore[attr-defined]
    return ssl_context_hook


def gunicorn_on_starting(server: Any) -> None:
    """gunicorn's ``on_starting`` server hook: stops gunicorn at start-up
    (ClientAuthNotRequired) when it would serve without TLS (gunicorn
    serves TLS only with ``certfile`` set) or without the context of
    :func:`gunicorn_ssl_context`, or when that context no longer requires
    a client certificate."""
    cfg = server.cfg
    if not cfg.is_ssl:
        raise ClientAuthNotRequired(
            "gunicorn would serve plain HTTP to anyone: its certfile setting is empty; set certfile to the server "
            "certificate file in the configuration file (gunicorn serves TLS only then; the key and the client "
            "checks come from ssl_context = gunicorn_ssl_context(ctx))"
        )
    ctx = getattr(cfg.ssl_context, "mtls_engine_context", None)
    if ctx is None:
        raise ClientAuthNotRequired(
            "gunicorn's ssl_context hook is not mtls_engine's: its own context would be used; set "
            "ssl_context = gunicorn_ssl_context(ctx) in the configuration file"
        )
    require_client_auth(ctx, "the SSLContext gunicorn will serve with")


def reload_crls(ctx: ssl.SSLContext, crlfile: str | os.PathLike[str]) -> bool:
    """:func:`mtls_engine.load_crls` for a running server: the outcome is
    logged (logger ``mtls_engine.server``), never raised, so that a bad or
    expired CRL file leaves the CRLs loaded before in force and the server
    up.  Returns whether the new CRLs were loaded."""
    from ._server import load_crls

    try:
        n = load_crls(ctx, crlfile)
    except Error as exc:
        log.error("CRL not reloaded (the CRLs loaded before stay in force): %s", exc)
        return False
    log.info("reloaded %d CRL(s) from %s", n, os.fspath(crlfile))
    return True


def reload_crls_on_sighup(ctx: ssl.SSLContext, crlfile: str | os.PathLike[str]) -> None:
    """From now on, SIGHUP makes ``ctx`` take the CRLs in ``crlfile`` again
    (the next handshake is checked against them; a bad CRL is logged and the
    old ones stay).  Call it in the server's running event loop (its start-up)."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_crls, ctx, os.fspath(crlfile))
