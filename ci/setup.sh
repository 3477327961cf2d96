#!/usr/bin/env bash
# Installs what mtls_engine needs on Debian 12/13 (as root), then builds it
# into .venv.  Safe to re-run: apt runs only when a package is missing.
#   bash ci/setup.sh --plan     only prints which apt suite gives pkcs11-provider
#   bash ci/setup.sh --detect   only prints the release, OpenSSL's own engine and
#                               provider folders, and which PKCS#11 engine and
#                               providers are installed there (nothing installed)
# The package names are the same on Debian 12 and 13 (checked against both
# releases' package lists); only pkcs11-provider's suite differs.  No library
# folder is written here: OpenSSL says where its engines and providers live.
set -euo pipefail
cd "$(dirname "$0")/.."

# pkcs11-provider: Debian 13 and later have it in the main suite; Debian 12
# only in bookworm-backports.  The release comes from /etc/debian_version
# ("12.11", "13.1", or "trixie/sid" on testing).
DEBIAN_VERSION_FILE=${MTLS_DEBIAN_VERSION_FILE:-/etc/debian_version}
provider_suite() {
  local v major
  v=$(cat "$DEBIAN_VERSION_FILE" 2>/dev/null || echo unknown)
  major=${v%%.*}
  case "$major" in
    ''|*[!0-9]*)
      case "$v" in
        bookworm*) echo bookworm-backports ;;
        ''|unknown) echo none ;;
        *) echo main ;;  # testing/sid: newer than 12
      esac ;;
    *)
      if ((major >= 13)); then echo main
      elif ((major == 12)); then echo bookworm-backports
      else echo none; fi ;;
  esac
}
# libp11's engine needs OpenSSL's ENGINE API, which OpenSSL 4 removed: on
# such a system the package is useless (and would pull in OpenSSL 3's libssl).
# What counts is the OpenSSL of the Python that will run mtls_engine.
PYTHON=${PYTHON:-python3}
engine_api() {
  local major
  major=$("$PYTHON" -c 'import ssl; print(ssl.OPENSSL_VERSION_INFO[0])' 2>/dev/null || true)
  if [ -z "$major" ] && command -v openssl >/dev/null 2>&1; then
    major=$(openssl version 2>/dev/null | sed -n 's/^OpenSSL \([0-9]*\)\..*/\1/p')
  fi
  case "$major" in
    ''|*[!0-9]*) echo yes ;;  # unknown yet (no Python, no openssl): Debian's are OpenSSL 3
    *) if ((major >= 4)); then echo no; else echo yes; fi ;;
  esac
}
if [ "${1:-}" = "--plan" ]; then
  echo "pkcs11-provider: $(provider_suite)"
  if [ "$(engine_api)" = yes ]; then
    echo "libengine-pkcs11-openssl: install"
  else
    echo "libengine-pkcs11-openssl: skip (this OpenSSL has no ENGINE API)"
  fi
  exit 0
fi

# A folder OpenSSL reports: openssl version -e prints ENGINESDIR: "<folder>",
# -m prints MODULESDIR: "<folder>" (OpenSSL 3 only; nothing on 1.1.1).
openssl_dir() {
  local flag=$1 out
  out=$(openssl version "$flag" 2>/dev/null) || return 0
  out=${out#*: }
  out=${out#\"}
  printf '%s\n' "${out%\"}"
}
# "path" when that file exists in the folder, else "none".
present() {
  if [ -n "$1" ] && [ -e "$1/$2" ]; then echo "$1/$2"; else echo none; fi
}
detect() {
  local engines modules
  engines=$(openssl_dir -e)
  modules=$(openssl_dir -m)
  echo "debian-version: $(cat "$DEBIAN_VERSION_FILE" 2>/dev/null || echo unknown)"
  echo "pkcs11-provider-suite: $(provider_suite)"
  echo "openssl: $(openssl version 2>/dev/null || echo none)"
  echo "enginesdir: ${engines:-none}"
  echo "modulesdir: ${modules:-none}"
  echo "libp11-engine: $(present "$engines" pkcs11.so)"
  # pkcs11-provider installs pkcs11.so; libp11 >= 0.4.14 also builds its own
  # provider, pkcs11prov.so.  mtls_engine's provider backend loads pkcs11.so.
  echo "pkcs11-provider: $(present "$modules" pkcs11.so)"
  echo "libp11-provider: $(present "$modules" pkcs11prov.so)"
}
if [ "${1:-}" = "--detect" ]; then
  detect
  exit 0
fi

PACKAGES=(
  softhsm2 opensc opensc-pkcs11 gnutls-bin p11-kit p11-kit-modules libp11-kit-dev
  libssl-dev libffi-dev pkg-config gcc openssl curl ca-certificates
  # Tools the tests use: valgrind (tests/test_memory.py), ss from iproute2
  # (listen backlogs); a minimal Debian (debootstrap minbase) has neither.
  valgrind iproute2
  # A TPM 2.0 token for the tests (docs/tokens.md): a software TPM, the
  # resource manager and its TCTI, tpm2-pkcs11 and its tools, dbus-daemon
  # for the resource manager's private bus (names checked with apt-cache on
  # Debian 12).
  swtpm tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools dbus-daemon
)
if [ "$(engine_api)" = yes ]; then
  PACKAGES+=(libengine-pkcs11-openssl)
else
  echo "== skipping libengine-pkcs11-openssl: this OpenSSL has no ENGINE API (the provider backend is used)"
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  PACKAGES+=(python3 python3-venv python3-dev)
  PYTHON=python3
elif ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  PACKAGES+=(python3-venv python3-dev)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
APT_UPDATED=""
apt_update() {
  [ -n "$APT_UPDATED" ] || { $SUDO apt-get update -qq; APT_UPDATED=1; }
}
if ((${#missing[@]})); then
  echo "== installing: ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nginx: the C reference server that benchmarks/serve_load.py runs from its
# own configuration in a temporary folder.  The package would start the
# system's nginx on port 80: while it is installed, a policy-rc.d (the
# Debian way to say "do not start services now") forbids that, unless the
# machine has its own policy already (containers usually do).
if ! dpkg-query -W -f='${Status}' nginx 2>/dev/null | grep -q "install ok installed"; then
  echo "== installing: nginx (the benchmark's reference server; its service is not started)"
  apt_update
  policy=/usr/sbin/policy-rc.d
  own_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
  fi
  nginx_rc=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null || nginx_rc=$?
  [ -z "$own_policy" ] || $SUDO rm -f "$policy"
  [ "$nginx_rc" = 0 ] || exit "$nginx_rc"
fi

if ! dpkg-query -W -f='${Status}' pkcs11-provider 2>/dev/null | grep -q "install ok installed"; then
  suite=$(provider_suite)
  case "$suite" in
    main)
      echo "== installing: pkcs11-provider"
      apt_update
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends pkcs11-provider >/dev/null ;;
    bookworm-backports)
      if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "== adding the bookworm-backports apt suite (for pkcs11-provider)"
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
          "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" |
          $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
        APT_UPDATED=""
      fi
      echo "== installing: pkcs11-provider (bookworm-backports)"
      apt_update
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports pkcs11-provider >/dev/null ;;
    *)
      echo "== pkcs11-provider: no package known for $(cat "$DEBIAN_VERSION_FILE" 2>/dev/null || echo 'this system');" \
        "the provider backend will be unavailable" ;;
  esac
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -c 'import mtls_engine, ssl; print("== mtls_engine", mtls_engine.__version__, "on", ssl.OPENSSL_VERSION)'
detect | sed 's/^/== /'
