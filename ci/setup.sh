#!/usr/bin/env bash
# Installs what mtls_engine needs on Debian 12/13 (as root), then builds it
# into .venv.  Safe to re-run: apt runs only when a package is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  softhsm2 libengine-pkcs11-openssl opensc opensc-pkcs11 gnutls-bin p11-kit libp11-kit-dev
  libssl-dev libffi-dev pkg-config gcc openssl curl ca-certificates
)
PYTHON=${PYTHON:-python3}
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
if ((${#missing[@]})); then
  echo "== installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -c 'import mtls_engine, ssl; print("== mtls_engine", mtls_engine.__version__, "on", ssl.OPENSSL_VERSION)'
