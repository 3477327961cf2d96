"""Finding the ``SSL_CTX *`` behind an ``ssl.SSLContext``, safely.

CPython exposes no accessor.  ``csrc/helper.c:mtls_ctx_candidate`` reads the
first field after the object header (the documented layout of every CPython
3.x ``PySSLContext``); this module accepts that candidate only after state
read through it matches state read *and changed* through the Python API, so a
different layout, a wrong offset or a foreign object is refused, never used.

The header size comes from ``_lib.check_interpreter`` (run at import):
``object.__basicsize__``, cross-checked against the build flags (16 bytes on
64-bit release and debug builds, 32 with Py_TRACE_REFS up to 3.12); PyPy and
free-threaded builds are refused there before anything is read.
"""

from __future__ import annotations

import _ssl
import ssl

from . import _lib
from ._errors import InterpreterSslError, NotAnSSLContext
from ._fork import ForkSafeLock
from ._lib import OBJECT_HEADER_SIZE, ffi, lib

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Never touched by mtls_engine otherwise, harmless on any context, and
# settable and clearable through the Python API: the probe bit we flip.
_PROBE_OPTION = int(ssl.OP_NO_TICKET)

_VERIFY_MODES = {
    ssl.CERT_NONE: 0,
    ssl.CERT_OPTIONAL: 1,  # SSL_VERIFY_PEER
    ssl.CERT_REQUIRED: 3,  # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
}

# Held while a context is validated (which flips an option and puts it
# back) and while mtls_engine's C code may change a context's options (the
# first hook sets OP_NO_RENEGOTIATION): the one would otherwise see, or
# undo, the other's change.
_lock = ForkSafeLock(reentrant=True)
options_lock = _lock


def _header_size() -> int:
    return OBJECT_HEADER_SIZE


def ssl_ctx_pointer(ctx: object, *, header_size: int | None = None) -> Any:
    """The validated ``SSL_CTX *`` of ``ctx``.

    Raises NotAnSSLContext for anything but an ``ssl.SSLContext``, and
    InterpreterSslError when the pointer cannot be proven to be this
    context's.  ``header_size`` exists only for tests of the refusal path.
    """
    if not isinstance(ctx, _ssl._SSLContext):
        raise NotAnSSLContext(
            f"expected an ssl.SSLContext, got {type(ctx).__module__}.{type(ctx).__qualname__}; "
            "create one with ssl.create_default_context() or mtls_engine.client_context()"
        )
    if _lib.BUILT_IN_OPENSSL is not None:
        # A fresh error each time: re-raising the stored one would grow its traceback.
        raise InterpreterSslError(str(_lib.BUILT_IN_OPENSSL))
    offset = _header_size() if header_size is None else header_size
    ptr_size = ffi.sizeof("void *")
    if type(ctx).__basicsize__ < offset + ptr_size:
        _refuse(f"the SSLContext object is {type(ctx).__basicsize__} bytes, too small for the layout")
    candidate = lib.mtls_ctx_candidate(id(ctx), offset)
    if candidate == ffi.NULL:
        _refuse("no readable SSL_CTX pointer after the object header")
    if not lib.mtls_readable(candidate, 256):
        _refuse("the candidate SSL_CTX pointer does not point to readable memory")
    with _lock:
        _validate(ctx, candidate)  # type: ignore[arg-type]
    return candidate


# The options as _ssl itself reads them (a plain int): ssl.SSLContext's
# property wraps them in ssl.Options, whose first unnamed combinations cost
# milliseconds to make (a cold start's validation made several).  They are
# set through the context's own property, with plain ints.
_OPTIONS: Any = vars(_ssl._SSLContext)["options"]  # the getset descriptor


def _options(ctx: ssl.SSLContext) -> int:
    return int(_OPTIONS.__get__(ctx, type(ctx)))


def _options_match(ctx: ssl.SSLContext, candidate: Any) -> bool:
    return int(lib.SSL_CTX_get_options(candidate)) == _options(ctx)


def _validate(ctx: ssl.SSLContext, candidate: Any) -> None:
    if not _options_match(ctx, candidate):
        _refuse("options read through the pointer differ from SSLContext.options")
    if lib.SSL_CTX_get_verify_mode(candidate) != _VERIFY_MODES.get(ctx.verify_mode, -1):
        _refuse("verify mode read through the pointer differs from SSLContext.verify_mode")
    # Change state through Python and watch it change through the pointer:
    # a stale or foreign pointer cannot follow both flips.
    original = _options(ctx)
    try:
        ctx.options = original ^ _PROBE_OPTION  # type: ignore[assignment]
        flipped = _options_match(ctx, candidate)
    finally:
        ctx.options = original  # type: ignore[assignment]
    if not flipped or not _options_match(ctx, candidate):
        _refuse("a change of SSLContext.options was not seen through the pointer")


def _refuse(why: str) -> None:
    raise InterpreterSslError(
        f"cannot find the OpenSSL SSL_CTX behind this ssl.SSLContext ({why}); this "
        "Python's ssl module is laid out differently from CPython's, so mtls_engine "
        "refuses to touch it. Use a standard CPython build, or report the Python "
        "version and build with this message"
    )
