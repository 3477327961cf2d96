"""Backends that turn a token object into an OpenSSL ``EVP_PKEY`` whose
private operations run on the token, inside OpenSSL.

``engine``: libp11's ``pkcs11`` engine (OpenSSL 1.1.1-3.x).  ``provider``:
pkcs11-provider (OpenSSL >= 3.0.7, and the only way on OpenSSL 4).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ._errors import BackendUnavailable, ObjectNotFound
from ._lib import consume_errors, ffi, lib, text
from ._p11 import KeyObject, Module, TokenInfo
from ._uri import format_uri

BACKENDS = ("engine", "provider")


def engines_dir() -> str:
    return text(lib.OPENSSL_info(lib.OPENSSL_INFO_ENGINES_DIR))


def engine_path() -> str | None:
    """libp11's engine: ``$MTLS_ENGINE_PKCS11_ENGINE``, else ``pkcs11.so`` (or
    ``libpkcs11.so``) in the engines directory OpenSSL itself reports."""
    override = os.environ.get("MTLS_ENGINE_PKCS11_ENGINE")
    if override:
        return override if os.path.exists(override) else None
    for name in ("pkcs11.so", "libpkcs11.so"):
        candidate = os.path.join(engines_dir(), name)
        if os.path.exists(candidate):
            return candidate
    return None


def engine_status() -> tuple[bool, str]:
    if not lib.MTLS_HAS_ENGINE:
        return False, "this OpenSSL has no ENGINE API (OpenSSL 4, or built with no-engine)"
    path = engine_path()
    if path is None:
        where = os.environ.get("MTLS_ENGINE_PKCS11_ENGINE") or os.path.join(engines_dir(), "pkcs11.so")
        return False, (
            f"libp11's pkcs11 engine is not installed ({where} does not exist); install it "
            "(Debian: apt-get install libengine-pkcs11-openssl) or set MTLS_ENGINE_PKCS11_ENGINE"
        )
    return True, path


def provider_status() -> tuple[bool, str]:
    return False, "the provider backend is not available in this version of mtls_engine"


def choose(backend: str) -> str:
    """The backend to use: ``engine``/``provider`` if available, or for
    ``auto`` the engine where it exists, else the provider."""
    if backend not in ("auto", *BACKENDS):
        raise BackendUnavailable(f"unknown backend {backend!r}; use 'engine', 'provider' or 'auto'")
    status = {"engine": engine_status, "provider": provider_status}
    if backend != "auto":
        ok, why = status[backend]()
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} is unavailable: {why}")
        return backend
    reasons = []
    for name in BACKENDS:
        ok, why = status[name]()
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise BackendUnavailable("no backend is available; " + "; ".join(reasons))


class _EngineBackend:
    """One engine instance per PKCS#11 module for the life of the process:
    a new instance would re-initialise libp11 and could log in again."""

    def __init__(self) -> None:
        self._engines: dict[str, Any] = {}
        self._lock = threading.Lock()

    def engine(self, module: Module) -> Any:
        with self._lock:
            e = self._engines.get(module.path)
            if e is None:
                path = engine_path()
                if path is None:
                    raise BackendUnavailable(engine_status()[1])
                lib.ERR_clear_error()
                e = lib.mtls_engine_open(path.encode(), module.path.encode())
                if e == ffi.NULL:
                    errors = consume_errors()
                    raise BackendUnavailable(
                        f"cannot start libp11's engine {path} for module {module.path}"
                        + (f" (OpenSSL: {'; '.join(errors)})" if errors else "")
                    )
                self._engines[module.path] = e
            return e

    def load_private_key(self, module: Module, token: TokenInfo, key: KeyObject) -> Any:
        attrs: list[tuple[str, bytes]] = [("serial", token.serial.encode()), ("token", token.label.encode())]
        if key.id:
            attrs.append(("id", key.id))
        if key.label:
            attrs.append(("object", key.label.encode()))
        attrs.append(("type", b"private"))
        uri = format_uri(attrs)
        e = self.engine(module)
        lib.ERR_clear_error()
        pkey = lib.mtls_engine_load_private_key(e, uri.encode())
        if pkey == ffi.NULL:
            errors = consume_errors()
            raise ObjectNotFound(
                f"libp11's engine could not load the private key {uri} that mtls_engine found on "
                f"{token}" + (f" (OpenSSL: {'; '.join(errors)})" if errors else "")
            )
        return ffi.gc(pkey, lib.EVP_PKEY_free)


ENGINE = _EngineBackend()


def load_private_key(backend: str, module: Module, token: TokenInfo, key: KeyObject) -> Any:
    if backend == "engine":
        return ENGINE.load_private_key(module, token, key)
    raise BackendUnavailable(provider_status()[1])
