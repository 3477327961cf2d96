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


def _ssl_module_path() -> str | None:
    import _ssl

    return getattr(_ssl, "__file__", None)


def _is_openssl_library(path: str) -> bool:
    return os.path.basename(path).startswith(("libssl", "libcrypto"))


# What a Python with OpenSSL built in (python-build-standalone, which uv
# installs) can still do: the stock route, which needs no OpenSSL symbol of
# the interpreter (measured, docs/support.md).
_INSTEAD = (
    "Use a Python whose ssl module links the system's shared libssl: the distribution's python3 "
    "(Debian: /usr/bin/python3), pyenv, or uv told to use it (uv venv --python /usr/bin/python3, "
    "or UV_PYTHON_PREFERENCE=only-system)"
)


def mapped_openssl_libraries(maps: str | None = None) -> list[str] | None:
    """The shared libssl/libcrypto files mapped into this process, read from
    ``/proc/self/maps`` (or from ``maps``); None where that file does not
    exist (not Linux), so nothing can be said."""
    if maps is None:
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                maps = f.read()
        except OSError:
            return None
    found: list[str] = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6:
            path = parts[5].strip()
            if _is_openssl_library(path) and ".so" in os.path.basename(path) and path not in found:
                found.append(path)
    return found


def check_openssl_is_shared(mapped: list[str] | None = None, *, ssl_module: str | None = None) -> None:
    """Raise InterpreterSslError when this process, whose ``_ssl`` is loaded,
    has no shared libssl/libcrypto mapped: OpenSSL is then inside the
    interpreter (as in python-build-standalone) and no extension can reach
    its SSL_CTX.  Runs at import, before the extension is loaded."""
    if mapped is None:
        mapped = mapped_openssl_libraries()
        if mapped is None:
            return  # no /proc: check_same_openssl decides after the load
    if mapped:
        return
    where = ssl_module if ssl_module is not None else (_ssl_module_path() or "built into the interpreter")
    raise InterpreterSslError(
        f"this Python has OpenSSL built in: its ssl module ({where}) loads no shared libssl/libcrypto, "
        "as in the Pythons uv installs (python-build-standalone), so the SSL_CTX inside an "
        "ssl.SSLContext belongs to a copy of OpenSSL that no extension can reach and mtls_engine cannot "
        "attach a card key to it (its commands config, uri-pem, list and check work, without a "
        f"handshake). {_INSTEAD}; or, with no mtls_engine in the program, let this Python's "
        "own OpenSSL load pkcs11-provider: OPENSSL_CONF from 'python -m mtls_engine config --backend "
        "provider --pin-source file:PATH' and a key file from 'python -m mtls_engine uri-pem', then "
        "ctx.load_cert_chain(cert, key_file, password='') (docs/support.md, 'Pythons with OpenSSL built in')"
    )


# Before the extension is loaded: on an interpreter mtls_engine cannot serve,
# say why instead of failing to load the binding (or worse, loading it).
OBJECT_HEADER_SIZE = check_interpreter()

# A Python with OpenSSL built in (uv's): the extension, linked to the
# system's shared OpenSSL, still serves what needs no SSL_CTX (config,
# uri-pem, list, check); every SSL_CTX access raises this refusal instead
# (_context.ssl_ctx_pointer), before a card is touched.
BUILT_IN_OPENSSL: InterpreterSslError | None
try:
    check_openssl_is_shared()
    BUILT_IN_OPENSSL = None
except InterpreterSslError as _refusal:
    BUILT_IN_OPENSSL = _refusal

try:
    from ._binding import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    if BUILT_IN_OPENSSL is not None:
        raise InterpreterSslError(f"{BUILT_IN_OPENSSL} (and the C extension cannot be loaded: {exc})") from exc
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
    "BUILT_IN_OPENSSL",
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


def _same_file(a: str, b: str | None) -> bool:
    if not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


_STATIC_ADVICE = (
    "mtls_engine needs a Python whose _ssl module links libssl/libcrypto as shared libraries "
    "(a distribution's python3, or pyenv/python-build against the system OpenSSL; not a "
    "relocatable build that bundles OpenSSL, such as python-build-standalone, which uv installs: "
    "uv venv --python /usr/bin/python3, or UV_PYTHON_PREFERENCE=only-system, makes uv use the system's)"
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


if BUILT_IN_OPENSSL is None:
    check_same_openssl()
