"""The one place that imports the compiled binding.

At import it proves that the extension and this interpreter's ``_ssl`` use
the *same loaded* libssl/libcrypto (same addresses, not just the same version
number); an ``SSL_CTX`` from one OpenSSL handed to another would corrupt
memory.  It also hosts the OpenSSL error-queue funnel.
"""

from __future__ import annotations

import ssl
from typing import Any

from ._errors import InterpreterSslError, OpenSSLError

try:
    from ._binding import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise InterpreterSslError(
        f"the mtls_engine C extension cannot be loaded ({exc}); reinstall the "
        "package with the same Python that runs it (pip install --force-reinstall "
        "--no-binary mtls_engine mtls_engine)"
    ) from exc

__all__ = ["consume_errors", "ffi", "lib", "raise_openssl", "text"]

_PROBES = ("SSL_CTX_new", "OpenSSL_version_num")


def _ssl_module_path() -> str | None:
    import _ssl

    return getattr(_ssl, "__file__", None)


def check_same_openssl(ssl_module_path: str | None = None, *, version: int | None = None) -> None:
    """Raise InterpreterSslError unless ``_ssl`` and the extension share one
    OpenSSL.  The arguments exist so tests can point the check elsewhere."""
    path = _ssl_module_path() if ssl_module_path is None else ssl_module_path
    want = ssl.OPENSSL_VERSION_NUMBER if version is None else version
    ours = lib.OpenSSL_version_num()
    if ours != want:
        raise InterpreterSslError(
            f"this Python's ssl module uses OpenSSL {want:#x} but mtls_engine was "
            f"built against {ours:#x}; rebuild mtls_engine with this interpreter "
            "(pip install --force-reinstall --no-cache-dir .)"
        )
    where = path.encode() if path else ffi.NULL
    for sym in _PROBES:
        theirs = lib.mtls_symbol_in(where, sym.encode())
        mine = lib.mtls_own_symbol(sym.encode())
        if theirs == ffi.NULL:
            raise InterpreterSslError(
                f"the ssl module ({path or 'built into the interpreter'}) does not use a "
                f"shared OpenSSL ({sym} is not visible from it, so OpenSSL is probably "
                "linked into _ssl statically); mtls_engine needs a Python whose _ssl "
                "links libssl/libcrypto as shared libraries"
            )
        if theirs != mine:
            raise InterpreterSslError(
                f"the ssl module uses {sym} from {text(lib.mtls_library_of(theirs))} but "
                f"mtls_engine is linked to {text(lib.mtls_library_of(mine))}; both must "
                "be the same library: rebuild mtls_engine with this interpreter"
            )


def text(p: Any) -> str:
    """A C string (or NULL) as str."""
    if p == ffi.NULL:
        return "?"
    return str(ffi.string(p).decode("utf-8", "replace"))


def consume_errors() -> list[str]:
    """Drain OpenSSL's error queue into readable strings (oldest first), so
    nothing is left behind for CPython's ``_ssl`` to misreport later."""
    out: list[str] = []
    buf = ffi.new("char[512]")
    while True:
        code = lib.ERR_get_error()
        if code == 0:
            return out
        lib.ERR_error_string_n(code, buf, len(buf))
        out.append(text(buf))


def raise_openssl(message: str, cls: type[OpenSSLError] = OpenSSLError) -> None:
    raise cls(message, consume_errors())


check_same_openssl()
