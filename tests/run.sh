#!/usr/bin/env bash
# The test suite, from a clean clone:  bash tests/run.sh [pytest arguments]
# Two pytest workers, whole files each (module fixtures such as test_distill_job.py's shared runs
# are built once per file). Run serially the suite kept this 2-core machine 75% busy (37.6 CPU-min
# in 25.3 min: launches wait on rendezvous, files and each other); a second worker fills the gaps.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
# Test-only pins (tests/requirements.txt), kept out of the job's environment file; a no-op once installed.
python -m pip install --quiet -r tests/requirements.txt
exec python -m pytest -q -n 2 --dist loadfile "$@"
