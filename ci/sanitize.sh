#!/usr/bin/env bash
# The test suite against an AddressSanitizer + UndefinedBehaviorSanitizer
# build of the extension (csrc/helper.c and the generated binding).  On
# demand, not part of ci/test.sh: it is several times slower.
#
#   bash ci/sanitize.sh [pytest arguments]   build (when needed), then run pytest
#   bash ci/sanitize.sh --build              build only
#   bash ci/sanitize.sh --help
#
# Nothing of .venv is touched: the sources are copied to .venv-asan/tree and
# built there, into the virtual environment .venv-asan (MTLS_ASAN_DIR
# overrides the folder).  The tests run from that copy, so every Python
# process they start imports the sanitized build.
#
# What such a run needs on this stack:
# - libasan must be the first library of an uninstrumented Python: it is
#   preloaded into Python processes only, by .venv-asan/bin/python (a
#   wrapper), and taken out of the environment again at start-up (a .pth
#   file), so tools the tests run (openssl, curl, p11tool, p11-kit) start
#   without it: p11tool deadlocks at exit under ASan.
# - ci/strip_deepbind.c, preloaded before libasan: pkcs11-provider
#   dlopen()s its module with RTLD_DEEPBIND, which ASan refuses.
# - a suppression for p11-kit-client.so 0.24's mechanism_list_purge,
#   which reads one element past the caller's array (fixed upstream).
# - leak detection off: OpenSSL, CPython and the PKCS#11 modules keep
#   process-lifetime allocations that LeakSanitizer would all report.
# - the resident-memory soak test deselected: ASan keeps freed memory in
#   quarantine (up to 256 MB) and adds shadow memory, so memory grows by
#   design (55 kB per handshake measured); its leak control still runs.
# Every sanitizer report goes to .venv-asan/reports/{asan,ubsan}.<pid>; the
# run fails when pytest fails or when any report was written.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
BUILD_ONLY=""
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --build) BUILD_ONLY=1; shift ;;
esac

DIR=${MTLS_ASAN_DIR:-$ROOT/.venv-asan}
TREE=$DIR/tree
REPORTS=$DIR/reports
CC=${CC:-cc}
command -v "$CC" >/dev/null || { echo "sanitize.sh: no C compiler ($CC)" >&2; exit 2; }
ASAN_LIB=$("$CC" -print-file-name=libasan.so)
UBSAN_LIB=$("$CC" -print-file-name=libubsan.so)
if [ ! -e "$ASAN_LIB" ] || [ ! -e "$UBSAN_LIB" ]; then
  echo "sanitize.sh: $CC has no libasan/libubsan (Debian: apt-get install libasan8 libubsan1, or gcc)" >&2
  exit 2
fi
ASAN_LIB=$(readlink -f "$ASAN_LIB")
# The interpreter .venv was made with (the one the suite is meant for).
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$(readlink -f .venv/bin/python); else PYTHON=$(command -v python3); fi
fi

# -- the copy of the sources, rebuilt when they changed ------------------------
mkdir -p "$TREE" "$REPORTS"
# A fresh copy each run (a file deleted from the sources must not linger),
# keeping only the build.
find "$TREE" -type f ! -name '_binding*.so' ! -path '*.egg-info/*' -delete
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - -cf - | tar -xf - -C "$TREE"
stamp=$(cd "$TREE" && cat csrc/* pyproject.toml setup.py | sha256sum | cut -c1-16)

PYTHON=$(readlink -f "$PYTHON")
if [ ! -e "$DIR/pyvenv.cfg" ]; then
  echo "== creating $DIR with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$DIR"
fi
# python.real: the interpreter itself (the venv's own python* names are
# symlinks to each other, and become the wrapper).
ln -sf "$PYTHON" "$DIR/bin/python.real"
# The wrapper: libasan first (then the RTLD_DEEPBIND filter) for this
# Python only; the .pth below restores the caller's LD_PRELOAD.  libstdc++
# is preloaded too: ASan looks up the real __cxa_throw when it starts, and a
# C++ module loaded later (SoftHSM2) that throws would otherwise stop the
# process with "CHECK failed: ... real___cxa_throw != 0" (seen in a
# multiprocessing child).
STDCXX=$("$CC" -print-file-name=libstdc++.so.6)
if [ -e "$STDCXX" ]; then STDCXX=":$STDCXX"; else STDCXX=""; fi
rm -f "$DIR/bin/python"
cat >"$DIR/bin/python" <<EOF
#!/bin/bash
MTLS_ASAN_OUTER_PRELOAD="\${LD_PRELOAD-}" LD_PRELOAD="$DIR/strip_deepbind.so:$ASAN_LIB$STDCXX\${LD_PRELOAD:+:\$LD_PRELOAD}" \\
  exec -a "\$0" "$DIR/bin/python.real" "\$@"
EOF
chmod +x "$DIR/bin/python"
for alias in python3 "$(basename "$PYTHON")"; do
  [ "$alias" = python ] || ln -sf python "$DIR/bin/$alias"
done
"$CC" -shared -fPIC -O2 -Wall -Werror -o "$DIR/strip_deepbind.so" ci/strip_deepbind.c -ldl

if [ "$(cat "$DIR/built" 2>/dev/null)" != "$stamp" ]; then
  echo "== building the extension with -fsanitize=address,undefined"
  # (pip and the compiler run without the sanitizer runtime: python.real)
  "$DIR/bin/python.real" -m pip install -q --upgrade pip setuptools wheel
  rm -f "$TREE"/mtls_engine/_binding*.so
  (cd "$TREE" && CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1" \
     LDFLAGS="-fsanitize=address,undefined" "$DIR/bin/python.real" -m pip install -q -e '.[dev]')
  # Without this, the tools the tests start would inherit libasan.
  site=$("$DIR/bin/python.real" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' "import os; v = os.environ.pop('MTLS_ASAN_OUTER_PRELOAD', None); (os.environ.__setitem__('LD_PRELOAD', v) if v else os.environ.pop('LD_PRELOAD', None)) if v is not None else None" \
    >"$site/mtls_asan_preload.pth"
  echo "$stamp" >"$DIR/built"
fi
ldd "$TREE"/mtls_engine/_binding*.so | grep -q libasan || { echo "sanitize.sh: the build is not sanitized" >&2; exit 1; }
(cd "$TREE" && ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 "$DIR/bin/python" -c \
  'import os, mtls_engine; assert "LD_PRELOAD" not in os.environ; print("== imports:", mtls_engine.__file__)')
# A control: ASan must catch a deliberate heap overflow in this set-up (a
# run that reports nothing means something only if it would have).
rm -rf "$REPORTS/control" && mkdir -p "$REPORTS/control"
if ASAN_OPTIONS="verify_asan_link_order=0:detect_leaks=0:log_path=$REPORTS/control/asan" "$DIR/bin/python" -c '
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memmove(libc.malloc(16), b"x" * 64, 64)' 2>/dev/null ||
  ! grep -qs "heap-buffer-overflow" "$REPORTS"/control/asan.*; then
  echo "sanitize.sh: AddressSanitizer missed a deliberate heap overflow: it is not active" >&2
  exit 1
fi
echo "== AddressSanitizer is active (it caught a deliberate 64-byte copy into 16 bytes)"
[ -z "$BUILD_ONLY" ] || { echo "== built: $DIR"; exit 0; }

# -- the run -----------------------------------------------------------------
cat >"$DIR/suppressions.asan" <<'EOF'
# p11-kit-client.so 0.24: mechanism_list_purge reads one element past the array
interceptor_via_lib:p11-kit-client.so
EOF
rm -f "$REPORTS"/asan.* "$REPORTS"/ubsan.*
export MTLS_SANITIZED=1  # tests skip only their resident-memory bounds (see the soak test above)
export ASAN_OPTIONS="verify_asan_link_order=0:detect_leaks=0:log_path=$REPORTS/asan:suppressions=$DIR/suppressions.asan:halt_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan"
echo "== pytest $* (sanitized build, reports in $REPORTS)"
status=0
(cd "$TREE" && "$DIR/bin/python" -m pytest -p no:cacheprovider \
   --deselect tests/test_soak.py::test_handshakes_and_recreated_contexts_do_not_leak "$@") || status=$?
reports=$(find "$REPORTS" -maxdepth 1 \( -name 'asan.*' -o -name 'ubsan.*' \) | sort)
if [ -n "$reports" ]; then
  echo "== sanitizer reports:"
  for f in $reports; do echo "--- $f"; head -40 "$f"; done
  status=1
else
  echo "== sanitizer reports: none"
fi
exit "$status"
