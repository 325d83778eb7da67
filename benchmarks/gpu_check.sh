#!/usr/bin/env bash
# What to run the first time a GPU machine is available (not in CI):
#   bash benchmarks/gpu_check.sh                  # in the project's venv (launch/env.sh makes it)
#   bash benchmarks/gpu_check.sh --system-python  # python3 on PATH as it is: no venv, no downloads
#   GPU_CHECK_PYTHON=/opt/conda/bin/python bash benchmarks/gpu_check.sh   # that python, likewise
# For a machine with no network and its own CUDA torch: that python needs torch (a CUDA build) and the
# rest of requirements.txt; section 0 says what is missing. Sections, each with its time budget on one
# H100/H200 after install (estimated, not measured: no GPU has run it yet; 6 min 30 s in all, under
# the 8 minutes a first 15-minute window leaves after start-up; on CPU here section 2 took 68 s at
# DEMO_STEPS=3, most of it data, tokenizer and start-up):
#   0. versions (python, torch + its CUDA, deepspeed, transformers, nvcc, GPUs and driver); stops with
#      exit 2 and what to install if torch is a CPU build or sees no GPU                          ~15 s
#   1. tests on the accelerator, each with its dtype named in its config: the one-device discipline
#      (bf16, 2 ranks, and one CUDA rank); with 2+ GPUs also launcher runs (fp32 TP 2, bf16 against
#      fp32, ZeRO-0 at fp32, ZeRO-1/2 stop and resume) on NCCL                                  ~90 s
#   2. the demo pipeline once, cut short: data, tokenizer, teacher (40 steps), distillation (40
#      steps), bf16, 1 GPU, TP 1; with 2+ GPUs the distillation again on an even number of GPUs,
#      all or all but one (TP 2)                                                                ~2 min
#   3. the paper's pair (launch/configs/gemma2_9b_to_1b.yaml, its DeepSpeed JSON unchanged) with the
#      9B / 1B architectures cut to TEACHER_LAYERS / STUDENT_LAYERS layers, sequence length 2048,
#      bf16, 1 GPU, TP 1, STEPS steps                                                           ~2.5 min
#   4. one table: planned against measured peak memory, tokens/s, host syncs per step (counted by
#      torch.cuda.set_sync_debug_mode in benchmarks/sync_count.py) and an MFU estimate          ~15 s
# The jobs of 2 and 3 go through benchmarks/sync_count.py; the distillations log every step. A failed
# section is reported and the next one still runs; the exit code is 1 if any failed.
# Everything lands in runs/gpu_check/ (one log per section).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-}
for arg in "$@"; do
  case "$arg" in
    --system-python) PY=${PY:-python3} ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--system-python]  (or GPU_CHECK_PYTHON=/path/to/python)" >&2; exit 2 ;;
  esac
done
if [[ -z "$PY" ]]; then
  source launch/env.sh
  PY=python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Nothing is downloaded: every model is built here from a config, the tokenizer is trained here.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
OUT=runs/gpu_check
TEACHER_LAYERS=${TEACHER_LAYERS:-4}
STUDENT_LAYERS=${STUDENT_LAYERS:-6}
MICRO_BATCH=${MICRO_BATCH:-2}
STEPS=${STEPS:-10}
DEMO_STEPS=${DEMO_STEPS:-40}

echo "== 0. versions"
"$PY" benchmarks/gpu_env.py  # exit 2, with what to install, before anything is written
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
EVEN_GPUS=$((GPUS - GPUS % 2))  # TP 2 needs an even world size
mkdir -p "$OUT"
# job SYNCS_DIR GPUS ARGS...: launch.distill ARGS through sync_count.py (host syncs into SYNCS_DIR).
# One GPU: no launcher, the one rank it would start, on the first GPU CUDA_VISIBLE_DEVICES leaves
# (the deepspeed launcher given --num_gpus drops CUDA_VISIBLE_DEVICES and counts GPUs from 0, which
# on a shared machine may be another user's); more: the deepspeed launcher.
job() {
  local syncs=$1 gpus=$2
  shift 2
  if [[ "$gpus" -eq 1 ]]; then
    "$PY" benchmarks/sync_count.py --syncs-out "$syncs" "$@"
  else
    "$PY" -m deepspeed.launcher.runner --num_gpus "$gpus" \
      --master_port "$("$PY" -c 'from model_parallel.spawn import free_port; print(free_port())')" \
      benchmarks/sync_count.py --syncs-out "$syncs" "$@"
  fi
}

tests() {
  "$PY" -m pytest -q -p no:cacheprovider tests/test_device_discipline.py
  if [[ "$GPUS" -ge 2 ]]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_distill_job.py -k "tp2_run or bf16_run or tensor_parallel_size or student_zero_stage"
  fi
}

DEMO=$OUT/demo
# distill_demo NAME GPUS TP: the demo's distillation, bf16, counted by sync_count.py, into $OUT/NAME.
distill_demo() {
  rm -rf "${OUT:?}/$1"
  job "$OUT/$1" "$2" --config launch/configs/demo_distill.yaml --set output_dir="$OUT/$1" \
    --set tokenizer="$DEMO/tokenizer" --set teacher.path="$DEMO/teacher/student" --set data.train="$DEMO/prepared/train" \
    --set data.eval="$DEMO/prepared/eval" --set train.dtype=bf16 --set parallel.tensor_parallel="$3" \
    --set train.max_steps="$DEMO_STEPS" --set train.warmup_steps=1 --set logging.every=1 \
    --set eval.every=0 --set eval.max_batches=4 --set checkpoint.every=100000
}

demo() {
  rm -rf "$DEMO"
  "$PY" -m data.synthetic --out "$DEMO/data" --seed 0 --mb 1
  "$PY" -m data.tokenizer --input "$DEMO/data/pretrain/train.txt" "$DEMO/data/sft/train.jsonl" --vocab-size 1024 \
    --out "$DEMO/tokenizer"
  for split in train eval; do
    "$PY" -m data.prepare --tokenizer "$DEMO/tokenizer" --input "$DEMO/data/pretrain/$split.txt" --format text \
      --seq-len 128 --out "$DEMO/prepared/$split" --num-proc 4
  done
  job "$DEMO/teacher" 1 --config launch/configs/demo_teacher.yaml \
    --set output_dir="$DEMO/teacher" --set tokenizer="$DEMO/tokenizer" --set data.train="$DEMO/prepared/train" \
    --set data.eval="$DEMO/prepared/eval" --set train.dtype=bf16 --set parallel.tensor_parallel=1 \
    --set train.max_steps="$DEMO_STEPS" --set train.warmup_steps=1 --set eval.max_batches=4 \
    --set checkpoint.every=100000
  distill_demo demo_distill_1gpu 1 1
  if [[ "$GPUS" -ge 2 ]]; then
    distill_demo demo_distill_all "$EVEN_GPUS" 2
  fi
}

gemma2() {
  "$PY" benchmarks/gpu_models.py --out "$OUT/models" --teacher-layers "$TEACHER_LAYERS" \
    --student-layers "$STUDENT_LAYERS" --tokenizer "$DEMO/tokenizer"
  rm -rf "$OUT/prepared-2048" "$OUT/gemma2"
  "$PY" -m data.prepare --tokenizer "$DEMO/tokenizer" --input "$DEMO/data/pretrain/train.txt" --format text \
    --seq-len 2048 --out "$OUT/prepared-2048" --num-proc 4
  job "$OUT/gemma2" 1 --config launch/configs/gemma2_9b_to_1b.yaml --set output_dir="$OUT/gemma2" \
    --set tokenizer="$DEMO/tokenizer" --set teacher.path="$OUT/models/teacher" --set student.config="$OUT/models/student.json" \
    --set data.train="$OUT/prepared-2048" --set data.eval=null --set train.dtype=bf16 \
    --set parallel.tensor_parallel=1 --set train.max_steps="$STEPS" --set train.warmup_steps=1 \
    --set train.micro_batch_size="$MICRO_BATCH" --set train.grad_accum=1 --set logging.every=1 \
    --set checkpoint.every=100000
}

failed=()
# section NAME FUNCTION: runs FUNCTION under set -e in a subshell, with its output in $OUT/NAME.log;
# a failure is recorded and the script goes on.
section() {
  local started=$SECONDS status=0
  echo "== $1"
  set +e
  ( set -e; "$2" ) 2>&1 | tee "$OUT/$2.log"
  status=${PIPESTATUS[0]}
  set -e
  if [[ "$status" -ne 0 ]]; then
    failed+=("$1 (exit $status, see $OUT/$2.log)")
  fi
  echo "-- $1: $([[ "$status" -eq 0 ]] && echo ok || echo FAILED), $((SECONDS - started)) s"
}
section "1. tests on the accelerator ($GPUS GPU(s))" tests
section "2. the demo pipeline, bf16, 1 GPU$([[ "$GPUS" -ge 2 ]] && echo ", then $EVEN_GPUS GPUs at TP 2")" demo
section "3. gemma2 9B/1B architectures, $TEACHER_LAYERS/$STUDENT_LAYERS layers, seq 2048, micro-batch $MICRO_BATCH, 1 GPU" gemma2

echo "== 4. summary"
runs=("demo distillation, 1 GPU, bf16=$OUT/demo_distill_1gpu")
[[ "$GPUS" -lt 2 ]] || runs+=("demo distillation, $EVEN_GPUS GPUs, TP 2, bf16=$OUT/demo_distill_all")
runs+=("gemma2 9B/1B cut to $TEACHER_LAYERS/$STUDENT_LAYERS layers, 1 GPU, bf16=$OUT/gemma2")
for item in "${failed[@]}"; do echo "FAILED: $item"; done
"$PY" benchmarks/gpu_summary.py "${runs[@]}" | tee "$OUT/summary.md"
[[ ${#failed[@]} -eq 0 ]]
