"""The one place that imports the compiled binding.

At import it first checks that this interpreter is one whose
``ssl.SSLContext`` layout mtls_engine knows (CPython, with the object header
its build flags predict, and not a free-threaded build), then proves that the
extension and this interpreter's ``_ssl`` use the *same loaded*
libssl/libcrypto (same addresses, not just the same version number); an
``SSL_CTX`` from one OpenSSL handed to another would corrupt memory.  Every
refusal is an :class:`InterpreterSslError` that says why and what to do.  It
also hosts the OpenSSL error-queue funnel.
"""

from __future__ import annotations

import os
import platform
import ssl
import struct
import sys
import sysconfig

from ._errors import InterpreterSslError, OpenSSLError
from ._record import dataclass

# Never imported at run time (import cost): annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True)
class InterpreterFacts:
    """What decides where an ``ssl.SSLContext`` keeps its ``SSL_CTX *``.

    ``of_this_process()`` reads them from the running interpreter; tests
    build other combinations (debug, trace-refs, free-threaded, PyPy) to
    check the decisions without such an interpreter."""

    implementation: str  # platform.python_implementation()
    version: tuple[int, int]
    object_header: int  # object.__basicsize__ == sizeof(PyObject)
    pointer_size: int
    debug: bool  # Py_DEBUG / Py_REF_DEBUG: sys.gettotalrefcount exists
    trace_refs: bool  # Py_TRACE_REFS: sys.getobjects exists
    free_threaded: bool  # Py_GIL_DISABLED (python3.13t and later "t" builds)

    @classmethod
    def of_this_process(cls) -> InterpreterFacts:
        return cls(
            implementation=platform.python_implementation(),
            version=(sys.version_info[0], sys.version_info[1]),
            object_header=int(object.__basicsize__),
            pointer_size=struct.calcsize("P"),
            debug=hasattr(sys, "gettotalrefcount"),
            trace_refs=hasattr(sys, "getobjects"),
            free_threaded=bool(sysconfig.get_config_var("Py_GIL_DISABLED")) or "t" in getattr(sys, "abiflags", ""),
        )

    def describe(self) -> str:
        flags = {"debug": self.debug, "trace-refs": self.trace_refs, "free-threaded": self.free_threaded}
        build = ", ".join(name for name, on in flags.items() if on) or "release"
        return f"{self.implementation} {self.version[0]}.{self.version[1]} ({build} build)"


def expected_object_header(facts: InterpreterFacts) -> int:
    """sizeof(PyObject) as CPython's headers define it for these build flags
    (GIL builds only): ob_refcnt and ob_type, plus the _ob_next/_ob_prev
    pair that Py_TRACE_REFS adds up to 3.12 (3.13 keeps the trace in a
    table instead and leaves the header alone).  Py_DEBUG alone has not
    changed the header since 3.8."""
    size = 2 * facts.pointer_size
    if facts.trace_refs and facts.version < (3, 13):
        size += 2 * facts.pointer_size
    return size


def check_interpreter(facts: InterpreterFacts | None = None) -> int:
    """The size of the object header that precedes ``SSL_CTX *ctx`` in this
    interpreter's ``PySSLContext``, or InterpreterSslError when mtls_engine
    cannot know it.  Runs at import, before the extension is loaded."""
    f = InterpreterFacts.of_this_process() if facts is None else facts
    if f.implementation != "CPython":
        raise InterpreterSslError(
            f"mtls_engine needs CPython: it attaches the card key to the OpenSSL SSL_CTX inside "
            f"CPython's ssl.SSLContext, and {f.implementation}'s ssl module is built differently "
            "(there is no such object to read). Run this program with CPython 3.9 or newer"
        )
    if f.free_threaded:
        raise InterpreterSslError(
            f"this is a free-threaded CPython ({f.describe()}, built with Py_GIL_DISABLED): its object "
            "header has another layout and other threads may use an ssl.SSLContext while mtls_engine "
            "attaches the key, and mtls_engine has not been proven on such a build, so it refuses to "
            "touch the SSL_CTX. Run it with the regular build of the same version (for example "
            f"python{f.version[0]}.{f.version[1]} instead of python{f.version[0]}.{f.version[1]}t)"
        )
    expected = expected_object_header(f)
    if f.object_header != expected:
        raise InterpreterSslError(
            f"this CPython's object header is {f.object_header} bytes, but a {f.describe()} should have "
            f"{expected}: the place of the SSL_CTX inside an ssl.SSLContext cannot be predicted, so "
            "mtls_engine refuses to read it. Use a standard release (or debug) build of CPython, and "
            "report this Python's version and configure options with this message"
        )
    return f.object_header


# Before the extension is loaded: on an interpreter mtls_engine cannot serve,
# say why instead of failing to load the binding (or worse, loading it).
OBJECT_HEADER_SIZE = check_interpreter()

try:
    from ._binding import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise InterpreterSslError(
        f"the mtls_engine C extension cannot be loaded ({exc}); reinstall the "
        "package with the same Python that runs it (pip install --force-reinstall "
        "--no-binary mtls_engine mtls_engine)"
    ) from exc

# The extension's own file: libp11's engine loads its PKCS#11 module through
# it (csrc/helper.c, C_GetFunctionList).  Absolute: the engine may load it
# after the working directory changed.
BINDING_PATH = os.path.abspath(sys.modules[__name__.rpartition(".")[0] + "._binding"].__file__ or "")

__all__ = [
    "BINDING_PATH",
    "OBJECT_HEADER_SIZE",
    "InterpreterFacts",
    "check_interpreter",
    "check_same_openssl",
    "consume_errors",
    "expected_object_header",
    "ffi",
    "lib",
    "raise_openssl",
    "text",
]

_PROBES = ("SSL_CTX_new", "OpenSSL_version_num")


def _ssl_module_path() -> str | None:
    import _ssl

    return getattr(_ssl, "__file__", None)


def _same_file(a: str, b: str | None) -> bool:
    if not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _is_openssl_library(path: str) -> bool:
    return os.path.basename(path).startswith(("libssl", "libcrypto"))


_STATIC_ADVICE = (
    "mtls_engine needs a Python whose _ssl module links libssl/libcrypto as shared libraries "
    "(a distribution's python3, or pyenv/python-build against the system OpenSSL; not a "
    "relocatable build that bundles OpenSSL, such as python-build-standalone)"
)
_REBUILD_ADVICE = (
    "rebuild mtls_engine with the Python that runs it (pip install --force-reinstall "
    "--no-cache-dir --no-binary mtls_engine mtls_engine, or pip install --force-reinstall . "
    "in a source checkout)"
)


def check_same_openssl(ssl_module_path: str | None = None, *, version: int | None = None) -> None:
    """Raise InterpreterSslError unless ``_ssl`` and the extension share one
    loaded OpenSSL.  The arguments exist so tests can point the check at a
    stand-in for ``_ssl`` (a shared object that must already be loaded)."""
    path = _ssl_module_path() if ssl_module_path is None else ssl_module_path
    where = path.encode() if path else ffi.NULL
    shown = path or "built into the interpreter"
    for sym in _PROBES:
        theirs = lib.mtls_symbol_in(where, sym.encode())
        mine = lib.mtls_own_symbol(sym.encode())
        if theirs == ffi.NULL:
            raise InterpreterSslError(
                f"the ssl module ({shown}) does not use a shared OpenSSL: {sym} is not visible from it, so "
                f"OpenSSL is linked into it statically with hidden symbols (or not at all); {_STATIC_ADVICE}"
            )
        if theirs != mine:
            holder = text(lib.mtls_library_of(theirs))
            if _same_file(holder, path) or (holder != "?" and not _is_openssl_library(holder)):
                raise InterpreterSslError(
                    f"the ssl module ({shown}) has its own copy of OpenSSL linked in statically "
                    f"({sym} is in {holder}), which mtls_engine cannot share; {_STATIC_ADVICE}"
                )
            raise InterpreterSslError(
                f"the ssl module ({shown}) uses another OpenSSL than mtls_engine: {sym} comes from "
                f"{holder} but mtls_engine is linked to {text(lib.mtls_library_of(mine))}; both must "
                f"be the same loaded library: {_REBUILD_ADVICE}"
            )
    want = ssl.OPENSSL_VERSION_NUMBER if version is None else version
    ours = lib.OpenSSL_version_num()
    if ours != want:
        raise InterpreterSslError(
            f"this Python's ssl module uses OpenSSL {want:#x} but mtls_engine was "
            f"built against {ours:#x}; {_REBUILD_ADVICE}"
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
