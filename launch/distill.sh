#!/usr/bin/env bash
# Launch the distillation job with the deepspeed launcher, on one node or several.
#   bash launch/distill.sh --config launch/configs/demo_distill.yaml [--set key=value ...]
#   NNODES=2 GPUS_PER_NODE=8 HOSTFILE=launch/hostfile.example MASTER_ADDR=node-a \
#     bash launch/distill.sh --config launch/configs/gemma2_9b_to_1b.yaml
# With NNODES > 1 the launcher reaches the other nodes over ssh (pdsh) using HOSTFILE; where ssh is
# not available (SLURM), start one copy per node with NODE_RANK set and NO_SSH=1 (see slurm.sbatch).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
HOSTFILE=${HOSTFILE:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-0}
NO_SSH=${NO_SSH:-0}

launcher=(deepspeed --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ "$NNODES" -gt 1 ]]; then
  [[ -n "$HOSTFILE" ]] || { echo "error: NNODES=$NNODES needs HOSTFILE (see launch/hostfile.example)" >&2; exit 2; }
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE")
  if [[ "$NO_SSH" == 1 ]]; then
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
  fi
else
  launcher+=(--num_gpus "$GPUS_PER_NODE")
fi
exec "${launcher[@]}" --module launch.distill "$@"
