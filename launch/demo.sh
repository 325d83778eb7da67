#!/usr/bin/env bash
# The main job on the embedded demo, from a clean clone:  bash launch/demo.sh
# Until the distillation job lands, this is the loss benchmark (benchmarks/loss.py): the tail-aware
# divergence against torch's and DeepSpeed's KL on [1024 x 32768] and [128 x 256000] logits.
# Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec python benchmarks/loss.py "$@"
