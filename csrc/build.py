"""cffi build script: compiles ``mtls_engine._binding``.

The extension must link against exactly the libssl/libcrypto that this
interpreter's ``_ssl`` module uses, so the library directory is read from the
running process after importing ``_ssl`` (``/proc/self/maps``) rather than
guessed.  ``MTLS_ENGINE_OPENSSL_PREFIX`` overrides it (headers in
``PREFIX/include``, libraries in ``PREFIX/lib``).  ``MTLS_ENGINE_DISABLE_ENGINE=1``
builds without the ENGINE backend, as on an OpenSSL without ENGINE support.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys
from typing import Any

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _loaded_openssl_libraries() -> list[str] | None:
    """The shared libssl/libcrypto _ssl loaded; None without /proc/self/maps."""
    import _ssl  # noqa: F401  (loads libssl/libcrypto into this process)

    found: list[str] = []
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6:
            name = os.path.basename(parts[5])
            if (name.startswith(("libssl.so", "libcrypto.so"))) and parts[5] not in found:
                found.append(parts[5])
    return found


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


def _build_flags() -> dict[str, Any]:
    include_dirs: list[str] = []
    library_dirs: list[str] = []
    runtime_dirs: list[str] = []
    link_args: list[str] = []
    prefix = os.environ.get("MTLS_ENGINE_OPENSSL_PREFIX")
    if prefix:
        include_dirs.append(os.path.join(prefix, "include"))
        for sub in ("lib64", "lib"):
            d = os.path.join(prefix, sub)
            if os.path.isdir(d):
                library_dirs.append(d)
                runtime_dirs.append(d)
        link_args += ["-lssl", "-lcrypto"]
    else:
        libs = _loaded_openssl_libraries()
        if libs == []:
            # OpenSSL built into the interpreter (uv's python-build-standalone):
            # no extension can share it.  Build against the system's shared
            # OpenSSL for what needs no SSL_CTX (config, uri-pem, list,
            # check); load_card_key refuses on such a Python (mtls_engine/_lib.py).
            print(
                "mtls_engine: OpenSSL is built into this Python (as in the Pythons uv installs, "
                "python-build-standalone): building against the system's shared OpenSSL for the "
                "commands config, uri-pem, list and check; load_card_key will refuse this Python "
                "(docs/support.md, 'Pythons with OpenSSL built in')",
                file=sys.stderr,
            )
            ossl = _pkg_config("--cflags", "--libs", "openssl")
            include_dirs += [a[2:] for a in ossl if a.startswith("-I")]
            link_args += [a for a in ossl if not a.startswith("-I")] or ["-lssl", "-lcrypto"]
        else:
            if libs is None or len(libs) != 2:
                sys.exit(
                    f"mtls_engine: this Python's _ssl module does not load libssl and "
                    f"libcrypto as shared libraries (found: {libs!r}). mtls_engine needs the "
                    "same shared OpenSSL as the interpreter; use a Python built against "
                    "a shared OpenSSL, or set MTLS_ENGINE_OPENSSL_PREFIX."
                )
            # Link by full path: records the same soname _ssl uses and does not
            # depend on the unversioned libssl.so development link.
            link_args += sorted(libs, key=lambda p: "libcrypto" in p)
            libdir = os.path.dirname(libs[0])
            inc = os.path.normpath(os.path.join(libdir, "..", "include"))
            if os.path.exists(os.path.join(inc, "openssl", "ssl.h")) and not inc.startswith("/usr"):
                include_dirs.append(inc)
            if libdir not in ("/lib", "/usr/lib", "/lib64", "/usr/lib64") and not libdir.startswith(
                ("/lib/", "/usr/lib/")
            ):
                runtime_dirs.append(libdir)
    p11 = _pkg_config("--cflags", "p11-kit-1")
    include_dirs += [a[2:] for a in p11 if a.startswith("-I")]
    if not p11:
        include_dirs.append("/usr/include/p11-kit-1")
    link_args += _pkg_config("--libs", "p11-kit-1") or ["-lp11-kit"]
    link_args += ["-ldl"]
    macros: list[tuple[str, str | None]] = []
    if os.environ.get("MTLS_ENGINE_DISABLE_ENGINE"):
        # Build as if OpenSSL had no ENGINE API (as OpenSSL 4 has not).
        macros.append(("MTLS_ENGINE_DISABLE_ENGINE", "1"))
    return {
        "define_macros": macros,
        "include_dirs": include_dirs,
        "library_dirs": library_dirs,
        "runtime_library_dirs": runtime_dirs,
        "extra_link_args": link_args,
    }


ffibuilder = FFI()
for header in ("openssl.h", "pkcs11.h", "helper.h"):
    ffibuilder.cdef((HERE / header).read_text())

ffibuilder.set_source(
    "mtls_engine._binding",
    """
/* The ENGINE API is deprecated since OpenSSL 3.0 but is still how libp11's
   engine is driven; helper.c guards it for builds without it. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/pkcs11.h>
#include <p11-kit/uri.h>
"""
    + (HERE / "helper.c").read_text(),
    **_build_flags(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
