#!/usr/bin/env bash
# Set-up, then the whole test suite.  Extra arguments go to pytest.
# Then the compatibility matrix (ci/matrix.py) in its quick mode over the
# oldest and newest CPython that pyenv has plus the default one, when pyenv
# is there (or MTLS_MATRIX is set).  MTLS_MATRIX=0 skips it, MTLS_MATRIX=all runs every interpreter
# with the full matrix test set; with pytest arguments it is skipped unless
# MTLS_MATRIX is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
status=0
.venv/bin/python -m pytest "$@" || status=$?

matrix=${MTLS_MATRIX:-}
if [ -z "$matrix" ]; then
  if (($#)); then matrix=0; else matrix=ci; fi
fi
if [ "$matrix" = 0 ]; then
  echo "== matrix: skipped (MTLS_MATRIX=0, or pytest arguments were given)"
elif [ -z "${MTLS_MATRIX:-}" ] && ! command -v pyenv >/dev/null 2>&1 && [ ! -d "${PYENV_ROOT:-$HOME/.pyenv}/versions" ]; then
  # With MTLS_MATRIX set it runs anyway, over the system's python3.N (as
  # ci/newest.sh does in its Debian sid root).
  echo "== matrix: skipped: no pyenv on this machine (only .venv's Python was tested)"
else
  # Its virtual environments are kept between runs on one machine (keyed by
  # pyproject.toml and each interpreter), so a run mostly rebuilds and tests.
  cache=${MTLS_MATRIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mtls_engine/matrix}
  args=(--cache "$cache")
  if [ "$matrix" != all ]; then args+=(--ci --quick); fi
  mstatus=0
  .venv/bin/python ci/matrix.py "${args[@]}" || mstatus=$?
  if ((status == 0)); then status=$mstatus; fi
fi
exit "$status"
