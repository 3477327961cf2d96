"""mtls_engine: TLS client (and server) authentication in Python's ``ssl``
with a private key that stays on a smart card, HSM or PKCS#11 token."""

from __future__ import annotations

from ._api import CardKey, client_context, load_card_key
from ._errors import (
    AmbiguousUri,
    BackendUnavailable,
    CertificateError,
    CertKeyMismatch,
    ConfigError,
    CrlError,
    Error,
    InterpreterSslError,
    ModuleLoadError,
    NotAnSSLContext,
    ObjectNotFound,
    OpenSSLError,
    PinError,
    PinFinalTry,
    PinIncorrect,
    PinLocked,
    PinRequired,
    PinWarning,
    Pkcs11Error,
    TokenNotFound,
    TokenUnavailable,
    UriError,
)
from ._inject import extract, inject, injected
from ._p11 import TokenInfo
from ._pin import pin_source, prompt_pin
from ._reconnect import reconnect
from ._server import Rejection, load_crls, pin_of, server_context

__version__ = "0.1.0"

__all__ = [
    "AmbiguousUri",
    "BackendUnavailable",
    "CardKey",
    "CertKeyMismatch",
    "CertificateError",
    "ConfigError",
    "CrlError",
    "Error",
    "InterpreterSslError",
    "ModuleLoadError",
    "NotAnSSLContext",
    "ObjectNotFound",
    "OpenSSLError",
    "PinError",
    "PinFinalTry",
    "PinIncorrect",
    "PinLocked",
    "PinRequired",
    "PinWarning",
    "Pkcs11Error",
    "Rejection",
    "TokenInfo",
    "TokenNotFound",
    "TokenUnavailable",
    "UriError",
    "client_context",
    "extract",
    "inject",
    "injected",
    "load_card_key",
    "load_crls",
    "pin_of",
    "pin_source",
    "prompt_pin",
    "reconnect",
    "server_context",
]
