"""mtls_engine: TLS client (and server) authentication in Python's ``ssl``
with a private key that stays on a smart card, HSM or PKCS#11 token."""

from __future__ import annotations

import importlib
import os
import sys

from ._errors import (
    AmbiguousUri,
    BackendUnavailable,
    CertificateError,
    CertKeyMismatch,
    ClientAuthNotRequired,
    ConfigError,
    CrlError,
    Error,
    InterpreterSslError,
    ModuleLoadError,
    NoClientCertificate,
    NotAnSSLContext,
    ObjectNotFound,
    OpenSSLError,
    PinError,
    PinFinalTry,
    PinIncorrect,
    PinLocked,
    PinOnCommandLine,
    PinRequired,
    PinWarning,
    Pkcs11Error,
    ProcessProtectionError,
    TokenNotFound,
    TokenUnavailable,
    UriError,
)


def _located_by_runpy_as_command() -> bool:
    """True while ``python -m mtls_engine ...`` imports this package: runpy
    imports a package before it runs its ``__main__``, with ``sys.argv[0]``
    set to ``"-m"`` until then, from ``runpy._run_module_as_main(mod_name)``.
    An application of the user's that imports mtls_engine (``python -m app``,
    ``python app.py``, ``-c``) never matches."""
    if sys.argv[:1] != ["-m"]:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run_module_as_main" and frame.f_globals.get("__name__") == "runpy":
            return frame.f_locals.get("mod_name") in (__name__, f"{__name__}.__main__")
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _imported_by_the_console_script() -> bool:
    """True while the ``mtls-engine`` command's wrapper (which pip writes:
    ``from mtls_engine.__main__ import run``) imports this package: that
    wrapper is the ``__main__`` module and is named ``mtls-engine``."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    return (
        bool(sys.argv)
        and os.path.basename(sys.argv[0]) in ("mtls-engine", "mtls-engine.exe")
        and script is not None
        and os.path.realpath(script) == os.path.realpath(sys.argv[0])
    )


# Set when this interpreter's ssl cannot be used and the package is being
# imported to run ``python -m mtls_engine`` or the ``mtls-engine`` command:
# __main__ then says so in one line and exits 1.  Everyone else gets the
# InterpreterSslError at import.
_import_refusal: InterpreterSslError | None = None

try:
    # The interpreter checks run when _lib is imported; the rest of the
    # package is imported on first use (__getattr__ below).
    from . import _lib  # noqa: F401
except InterpreterSslError as exc:
    if not (_located_by_runpy_as_command() or _imported_by_the_console_script()):
        raise
    _import_refusal = exc

# Public names imported on first use (PEP 562), so that ``import
# mtls_engine`` loads neither cryptography, nor the server side, the CLI
# or the integrations: a process that only attaches a card key never pays
# for them.
_LAZY = {
    "CardKey": "_api",
    "client_identity": "_identity",
    "require_client_auth": "_identity",
    "protect_process": "_protect",
    "client_context": "_api",
    "load_card_key": "_api",
    "extract": "_inject",
    "inject": "_inject",
    "injected": "_inject",
    "TokenInfo": "_p11",
    "pin_source": "_pin",
    "prompt_pin": "_pin",
    "reconnect": "_reconnect",
    "Rejection": "_server",
    "describe_failure": "_server",
    "load_crls": "_server",
    "pin_of": "_server",
    "server_context": "_server",
}

TYPE_CHECKING = False  # typing is not imported at run time either (import cost)
if TYPE_CHECKING:
    from typing import Any

    from ._api import CardKey, client_context, load_card_key
    from ._identity import client_identity, require_client_auth
    from ._inject import extract, inject, injected
    from ._p11 import TokenInfo
    from ._pin import pin_source, prompt_pin
    from ._protect import protect_process
    from ._reconnect import reconnect
    from ._server import Rejection, describe_failure, load_crls, pin_of, server_context


def __getattr__(name: str) -> Any:
    """A public name of ``_LAZY``, imported on first use (then kept)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "AmbiguousUri",
    "BackendUnavailable",
    "CardKey",
    "CertKeyMismatch",
    "CertificateError",
    "ClientAuthNotRequired",
    "ConfigError",
    "CrlError",
    "Error",
    "InterpreterSslError",
    "ModuleLoadError",
    "NoClientCertificate",
    "NotAnSSLContext",
    "ObjectNotFound",
    "OpenSSLError",
    "PinError",
    "PinFinalTry",
    "PinIncorrect",
    "PinLocked",
    "PinOnCommandLine",
    "PinRequired",
    "PinWarning",
    "Pkcs11Error",
    "ProcessProtectionError",
    "Rejection",
    "TokenInfo",
    "TokenNotFound",
    "TokenUnavailable",
    "UriError",
    "client_context",
    "client_identity",
    "describe_failure",
    "extract",
    "inject",
    "injected",
    "load_card_key",
    "load_crls",
    "pin_of",
    "pin_source",
    "prompt_pin",
    "protect_process",
    "reconnect",
    "require_client_auth",
    "server_context",
]
