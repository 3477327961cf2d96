#!/usr/bin/env bash
# The whole suite in CI mode on Debian's newest platform (run on demand: it
# takes 10-30 minutes, too slow for every CI run).  As root on a Debian host:
#   bash ci/newest.sh ROOT [pytest arguments]
# makes ROOT a Debian sid system with debootstrap (minbase; kept between runs,
# its packages upgraded), copies this checkout into it (what git tracks
# or would, as it is in the working tree) and runs `CI=true bash ci/test.sh`
# there: ci/setup.sh installs the packages and builds .venv with sid's
# python3, exactly as on a new user's machine.  The versions it ran with are
# printed first; the exit status is the suite's.
#   MTLS_NEWEST_SUITE=sid       the Debian suite (sid by default)
#   MTLS_NEWEST_MIRROR=URL      the Debian mirror (default: the one this
#                               host's apt uses for Debian)
# Only Debian's own packages go into the root: no interpreter or library is
# built from source here.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
ROOT=$(realpath -m "$1")
shift
SUITE=${MTLS_NEWEST_SUITE:-sid}
[ "$(id -u)" = 0 ] || { echo "ci/newest.sh: run as root (debootstrap, chroot and mounts need it)" >&2; exit 2; }

# The Debian mirror this host's apt uses: the first URIs:/deb line naming a
# .../debian archive (not debian-security) in its sources.
host_mirror() {
  local line
  line=$(grep -hsE '^[[:space:]]*(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
    /etc/apt/sources.list.d/*.list 2>/dev/null | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | head -n1)
  printf '%s\n' "${line%% *}"
}
MIRROR=${MTLS_NEWEST_MIRROR:-$(host_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null 2>&1 || {
  echo "== installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  echo "== debootstrap --variant=minbase $SUITE $ROOT $MIRROR"
  mkdir -p "$ROOT"
  debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 || {
    tail -n 30 "$ROOT.debootstrap.log" >&2
    exit 1
  }
fi
# A snapshot mirror serves a Release file past its Valid-Until date.
echo 'Acquire::Check-Valid-Until "false";' >"$ROOT/etc/apt/apt.conf.d/99mtls-newest"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's trust store, for pip behind a proxy the host trusts.
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/mtls-host-ca.crt"
fi

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
for fs in proc sys dev dev/pts; do
  mkdir -p "$ROOT/$fs"
  if ! mountpoint -q "$ROOT/$fs"; then
    mount --bind "/$fs" "$ROOT/$fs"
    mounted+=("$ROOT/$fs")
  fi
done

echo "== copying this checkout to $ROOT/src/mtls_engine"
rm -rf "$ROOT/src/mtls_engine"
mkdir -p "$ROOT/src/mtls_engine"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/src/mtls_engine"
else
  tar --exclude=.venv --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$ROOT/src/mtls_engine"
fi

inside() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
    ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} PIP_DISABLE_PIP_VERSION_CHECK=1 \
    $([ -e "$ROOT/etc/mtls-host-ca.crt" ] && echo PIP_CERT=/etc/mtls-host-ca.crt) \
    CI=true DEBIAN_FRONTEND=noninteractive MTLS_MATRIX="${MTLS_MATRIX:-ci}" "$@"
}
echo "== upgrading $SUITE's packages"
inside apt-get update -qq
inside apt-get -y -qq dist-upgrade >/dev/null
# ci/setup.sh needs python3 before it can ask it which OpenSSL it has; the
# other CPython minor versions the suite offers (sid: 3.14 and 3.15) are for
# the compatibility matrix, which ci/test.sh runs after the suite.
inside apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev git >/dev/null
pythons=$(inside apt-cache pkgnames | sed -n 's/^\(python3\.[0-9][0-9]*\)-venv$/\1/p' | sort -u)
for py in $pythons; do
  inside apt-get install -y -qq --no-install-recommends "$py" "$py-dev" "$py-venv" >/dev/null ||
    echo "== $py: not installable in $SUITE today (left out of the matrix)"
done

status=0
inside bash -c 'cd /src/mtls_engine && bash ci/setup.sh >/dev/null' || status=$?
if ((status == 0)); then
  echo "== versions in the $SUITE root"
  inside bash -c 'cat /etc/debian_version; python3 --version; openssl version
    /src/mtls_engine/.venv/bin/python -c "import ssl; print(\"ssl:\", ssl.OPENSSL_VERSION)"
    ls /usr/bin | grep -E "^python3\.[0-9]+$" | while read -r py; do echo "$py: $("$py" --version)"; done
    for p in libssl3t64 libssl4 libengine-pkcs11-openssl pkcs11-provider softhsm2 p11-kit opensc gnutls-bin curl; do
      printf "%s: %s\n" "$p" "$(dpkg-query -W -f="\${Version}" "$p" 2>/dev/null || echo not installed)"
    done' || true
  inside bash -c 'cd /src/mtls_engine && bash ci/test.sh "$@"' bash "$@" || status=$?
fi
echo "== ci/newest.sh: exit status $status ($SUITE root $ROOT)"
exit "$status"
