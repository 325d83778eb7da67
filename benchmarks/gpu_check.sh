#!/usr/bin/env bash
# What to run the first time a GPU machine is available (not in CI):  bash benchmarks/gpu_check.sh
#   1. the tests that exercise the accelerator: the one-device discipline and bf16 on CUDA engines
#      (NCCL when there are 2+ GPUs), and with 2+ GPUs the launcher runs (TP 2, resume, bf16);
#   2. the demo in bf16 on 1 GPU, then on all GPUs (NCCL, TP 2 where there are 2+);
#   3. the paper's pair (launch/configs/gemma2_9b_to_1b.yaml, its DeepSpeed JSON unchanged) with
#      the 9B / 1B architectures cut to TEACHER_LAYERS / STUDENT_LAYERS layers, sequence length
#      2048, on 1 GPU (TP 1): prints peak accelerator memory (torch.cuda.max_memory_allocated,
#      as the job logs it in metrics.jsonl) beside the planner's estimate for the same layout
#      (planned_peak_memory_gb, which the job logs next to it; training.plan), and tokens/s.
# Everything lands in runs/gpu_check/; a summary is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
OUT=runs/gpu_check
TEACHER_LAYERS=${TEACHER_LAYERS:-4}
STUDENT_LAYERS=${STUDENT_LAYERS:-6}
MICRO_BATCH=${MICRO_BATCH:-2}
STEPS=${STEPS:-10}
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
[[ "$GPUS" -ge 1 ]] || { echo "error: no CUDA device visible (torch.cuda.device_count() is 0)" >&2; exit 2; }
mkdir -p "$OUT"
: > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"

echo "== 1. tests on the accelerator"
bash tests/run.sh tests/test_device_discipline.py
if [[ "$GPUS" -ge 2 ]]; then
  bash tests/run.sh tests/test_distill_job.py -k "tp2_run or resume_reproduces or bf16 or tensor_parallel_size"
fi

summarise() {  # summarise NAME RUN_DIR: peak memory and mean tokens/s over the steps after the first
  python - "$1" "$2" <<'PY'
import json, sys
name, run = sys.argv[1:]
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if '"loss"' in line]
rates = [r["tokens_per_s"] for r in records if r["step"] > 1]
peak = max(r.get("peak_memory_gb", float("nan")) for r in records)
planned = records[-1].get("planned_peak_memory_gb", float("nan"))
print(f"{name}: {len(records)} logged steps, final loss {records[-1]['loss']:.4f}, "
      f"peak memory {peak:.2f} GB (planned {planned:.2f} GB, ratio {planned / peak:.2f}), "
      f"{sum(rates) / max(len(rates), 1):,.0f} tokens/s (mean after step 1)")
PY
}

echo "== 2. the demo, bf16, 1 GPU and $GPUS GPU(s)"
rm -rf runs/demo/teacher runs/demo/distill
NUM_PROCS=1 bash launch/demo.sh --set train.dtype=bf16 --set parallel.tensor_parallel=1 | tee "$OUT/demo_1gpu.log"
summarise "demo distill, 1 GPU" runs/demo/distill | tee -a "$OUT/summary.txt"
rm -rf runs/demo/teacher runs/demo/distill
TP=$([[ "$GPUS" -ge 2 ]] && echo 2 || echo 1)
NUM_PROCS=$GPUS bash launch/demo.sh --set train.dtype=bf16 --set parallel.tensor_parallel="$TP" | tee "$OUT/demo_all.log"
summarise "demo distill, $GPUS GPU(s), TP $TP" runs/demo/distill | tee -a "$OUT/summary.txt"

echo "== 3. gemma2_9b_to_1b architectures, $TEACHER_LAYERS/$STUDENT_LAYERS layers, seq 2048, 1 GPU"
python benchmarks/gpu_models.py --out "$OUT/models" --teacher-layers "$TEACHER_LAYERS" \
  --student-layers "$STUDENT_LAYERS" --tokenizer runs/demo/tokenizer
python -m data.prepare --tokenizer runs/demo/tokenizer --input runs/demo/data/pretrain/train.txt --format text \
  --seq-len 2048 --out "$OUT/prepared" --num-proc 4
rm -rf "$OUT/gemma2"
deepspeed --num_gpus 1 --module launch.distill --config launch/configs/gemma2_9b_to_1b.yaml \
  --set output_dir="$OUT/gemma2" --set tokenizer=runs/demo/tokenizer --set teacher.path="$OUT/models/teacher" \
  --set student.config="$OUT/models/student.json" --set data.train="$OUT/prepared" --set data.eval=null \
  --set parallel.tensor_parallel=1 --set train.max_steps="$STEPS" --set train.warmup_steps=1 \
  --set train.micro_batch_size="$MICRO_BATCH" --set train.grad_accum=1 --set logging.every=1 \
  --set checkpoint.every=100000 | tee "$OUT/gemma2.log"
summarise "gemma2 9B/1B architectures ($TEACHER_LAYERS/$STUDENT_LAYERS layers), micro-batch $MICRO_BATCH x 2048, 1 GPU" \
  "$OUT/gemma2" | tee -a "$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
