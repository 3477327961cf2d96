#!/usr/bin/env bash
# Set-up, a SoftHSM2 demo token in ./demo-token, and a real mTLS handshake
# through Python's ssl module signed by the token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec .venv/bin/python -m mtls_engine._demo --dir demo-token "$@"
