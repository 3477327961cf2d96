#!/usr/bin/env bash
# Build a stand-in for uv's Pythons (python-build-standalone): CPython with
# OpenSSL linked in statically and its symbols hidden.
#
#   bash ci/build_static_python.sh SOURCE [PREFIX]
#
# SOURCE is an unpacked CPython 3.12/3.13 source tree or its release tarball
# (Python-3.12.x.tgz from python.org); MTLS_CPYTHON_SOURCE may name it
# instead. Nothing is downloaded. PREFIX defaults to
# ${XDG_CACHE_HOME:-~/.cache}/mtls_engine/static-python/<version>, outside the
# repository; the interpreter is PREFIX/bin/python3.N, printed last.
#
# The shape is python-build-standalone's: _ssl and _hashlib are built into
# libpython (no _ssl*.so; `_ssl.__file__` does not exist), linked with
# Debian's libssl.a/libcrypto.a (package libssl-dev) and
# -Wl,--exclude-libs,ALL, so no OpenSSL symbol is exported. Only what the
# stock OpenSSL route needs is built: no test modules, no pip, no Tk, curses,
# readline, sqlite or dbm. It prints the build time and the exported OpenSSL
# symbols (there must be none) at the end.
#
# Use it (docs/support.md, "Pythons with OpenSSL built in"):
#   MTLS_STATIC_PYTHON=$(bash ci/build_static_python.sh Python-3.12.0.tgz | tail -1) \
#       .venv/bin/python -m pytest tests/test_static_python.py
set -euo pipefail

src=${1:-${MTLS_CPYTHON_SOURCE:-}}
if [ -z "$src" ] || [ ! -e "$src" ]; then
    echo "usage: $0 SOURCE [PREFIX]  (SOURCE: a CPython 3.12/3.13 source tree or tarball; got '${src}')" >&2
    exit 2
fi
multiarch=$(gcc -print-multiarch 2>/dev/null || true)
libdir=/usr/lib/${multiarch:-x86_64-linux-gnu}
for a in libssl.a libcrypto.a; do
    if [ ! -f "$libdir/$a" ]; then
        echo "$0: $libdir/$a is missing: install libssl-dev" >&2
        exit 2
    fi
done

cache=${XDG_CACHE_HOME:-$HOME/.cache}/mtls_engine/static-python
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -d "$src" ]; then
    cp -a "$src/." "$work/src"
else
    mkdir "$work/src"
    tar -xf "$src" -C "$work/src" --strip-components=1
fi
cd "$work/src"
version=$(sed -n 's/^#define PY_VERSION[[:space:]]*"\([0-9.]*\).*"/\1/p' Include/patchlevel.h)
short=${version%.*}
case "$short" in
3.12 | 3.13) ;;
*) echo "$0: CPython $version: this script is written for 3.12 and 3.13" >&2; exit 2 ;;
esac
prefix=${2:-$cache/$version}
rm -rf "$prefix"

start=$(date +%s)
# Built into libpython, as python-build-standalone does; makesetup takes
# Setup.local's lines before configure's shared _ssl/_hashlib.
cat > Modules/Setup.local <<EOF
*static*
_ssl _ssl.c -I/usr/include $libdir/libssl.a $libdir/libcrypto.a -ldl
_hashlib _hashopenssl.c -I/usr/include $libdir/libcrypto.a -ldl
EOF
off=()
for m in _tkinter _curses _curses_panel _dbm _gdbm _sqlite3 _lzma _bz2 _uuid readline _decimal \
    xxlimited xxlimited_35 xxsubtype _xxtestfuzz; do
    off+=("py_cv_module_$m=n/a")
done
nice ./configure -q --prefix="$prefix" --enable-shared --without-ensurepip --disable-test-modules \
    LDFLAGS="-Wl,--exclude-libs,ALL -Wl,-rpath,$prefix/lib" "${off[@]}" > "$work/configure.log"
nice make -s -j2 > "$work/make.log" 2>&1 || { tail -40 "$work/make.log" >&2; exit 1; }
nice make -s altinstall COMPILEALL_OPTS=-j2 > "$work/install.log" 2>&1 || { tail -40 "$work/install.log" >&2; exit 1; }
end=$(date +%s)

python="$prefix/bin/python$short"
libpython="$prefix/lib/libpython$short.so.1.0"
echo "== built CPython $version in $((end - start)) s into $prefix" >&2
"$python" -c 'import ssl, _ssl; print("==", ssl.OPENSSL_VERSION, "built in:", not hasattr(_ssl, "__file__"))' >&2
exported=$(nm -D --defined-only "$libpython" "$python" | grep -cE ' (SSL|OPENSSL|OpenSSL|EVP|CRYPTO|ERR)_' || true)
echo "== OpenSSL symbols exported by libpython and python: $exported" >&2
if ldd "$python" "$libpython" | grep -qE 'lib(ssl|crypto)\.so'; then
    echo "$0: the interpreter links a shared libssl/libcrypto" >&2
    exit 1
fi
[ "$exported" = 0 ] || exit 1
echo "$python"
