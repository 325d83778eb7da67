#!/usr/bin/env bash
# The test suite, from a clean clone:  bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec python -m pytest -q "$@"
