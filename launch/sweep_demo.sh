#!/usr/bin/env bash
# The paper's comparison at demo scale, both of its settings, teachers included, and on-policy
# distillation on the maths setting (seeds 0, 1, 2):
#   bash launch/sweep_demo.sh [OUT]          (default runs/sweep; see the README for the time it takes)
# 1. pre-training distillation: two teachers, the demo teacher (demo_teacher.yaml) and one with four
#    times its non-embedding parameters trained the same way (demo_teacher_large.yaml), each into
#    fresh students on the demo corpus (demo_distill.yaml): $PRETRAIN_LOSSES, K 10, beta 1, beta mode
#    constant and sequence (ce, kl-t1, tail-k10-b1-t1, tail-k10-b1-t1-seq, topk_bucket-k10-t1 and
#    miniplm per teacher; a reduced grid, so that the whole script stays under an hour on 2 CPU cores;
#    miniplm: ce on the half of the corpus data.miniplm selects with that teacher and a reference model
#    the sweep trains once, demo_miniplm_reference.yaml);
# 2. supervised maths distillation: the demo teacher fine-tuned on the word problems
#    (demo_sft_teacher.yaml; its math accuracy is printed), distilled into students that all start
#    from the same pre-trained student (the demo's, demo_distill.yaml) on the word problems with the
#    prompt tokens masked (demo_sft_distill.yaml), evaluated with math accuracy too: $SFT_LOSSES, K 10,
#    beta 1 (ce, kl-t1, tail-k10-b1-t1, topk_bucket-k10-t1; reverse_kl and beta 2, far behind in the
#    earlier full grid, are left out so that the script stays near an hour).
# Restartable: what exists is reused (teachers, students, runs). Extra arguments go to both sweeps.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
DEMO=runs/demo
OUT=${1:-runs/sweep}
shift || true
NUM_PROCS=${NUM_PROCS:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
# The demo runs these on one tensor-parallel rank per process: the fastest layout of the tiny pair.
FAST=(--set parallel.tensor_parallel=1 --set parallel.student_zero_stage=2)
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }

if [[ -n "${DRY_RUN:-}" || ! -f "$DEMO/prepared/sft-eval/manifest.json" ]]; then
  run python -m data.synthetic --out "$DEMO/data" --seed 0 --mb 4
  run python -m data.tokenizer --input "$DEMO/data/pretrain/train.txt" "$DEMO/data/sft/train.jsonl" --vocab-size 1024 \
    --out "$DEMO/tokenizer"
  for split in train eval; do
    run python -m data.prepare --tokenizer "$DEMO/tokenizer" --input "$DEMO/data/pretrain/$split.txt" --format text \
      --seq-len 128 --out "$DEMO/prepared/pretrain-$split" --num-proc 2
    run python -m data.prepare --tokenizer "$DEMO/tokenizer" --input "$DEMO/data/sft/$split.jsonl" --format sft \
      --seq-len 192 --drop-long --out "$DEMO/prepared/sft-$split"
  done
fi
train() {  # train CONFIG OUTPUT_DIR: unless OUTPUT_DIR/student exists
  [[ -z "${DRY_RUN:-}" && -f "$2/student/config.json" ]] && return 0
  run deepspeed --num_gpus "$NUM_PROCS" --module launch.distill --config "$1" "${FAST[@]}"
}
train launch/configs/demo_teacher.yaml "$DEMO/teacher"
train launch/configs/demo_teacher_large.yaml "$DEMO/teacher_large"
train launch/configs/demo_distill.yaml "$DEMO/distill"
train launch/configs/demo_sft_teacher.yaml "$DEMO/sft_teacher"
run python -m eval.math --model "$DEMO/sft_teacher/student" --data "$DEMO/data/sft/eval.jsonl" --max-examples 100 \
  --max-new-tokens 64 | sed 's/^/math accuracy of the SFT teacher: /'

# The settings of each sweep (eval.sweep --losses: registry kinds and sweep-only settings); set
# either in the environment to run fewer or more.
PRETRAIN_LOSSES=${PRETRAIN_LOSSES:-ce,kl,tail,topk_bucket,miniplm}
SFT_LOSSES=${SFT_LOSSES:-ce,kl,tail,topk_bucket}
run python -m eval.sweep --config launch/configs/demo_distill.yaml --out "$OUT/pretrain" "${FAST[@]}" \
  --teachers "demo=$DEMO/teacher/student,large=$DEMO/teacher_large/student" --losses "$PRETRAIN_LOSSES" \
  --top-k 10 --beta 1 --beta-mode constant,sequence --seeds 0,1,2 \
  --set train.max_steps=150 --set eval.every=0 --eval-batches 16 --launcher-args "--num_gpus $NUM_PROCS" "$@"
run python -m eval.sweep --config launch/configs/demo_sft_distill.yaml --out "$OUT/sft" "${FAST[@]}" \
  --losses "$SFT_LOSSES" --top-k 10 --beta 1 --seeds 0,1,2 \
  --math-data "$DEMO/data/sft/eval.jsonl" --math-examples 50 --eval-batches 16 \
  --launcher-args "--num_gpus $NUM_PROCS" "$@"
# 3. on-policy distillation (issue 24) on the maths SFT setting, where exposure bias matters most: kl
#    and tail K 10 beta 1 at on_policy.fraction 0, 0.5 and 1 (kl-t1-op0, ..., tail-k10-b1-t1-op1), with
#    48-token continuations and 100 steps so that the grid fits next to the others.
ON_POLICY=${ON_POLICY:-0,0.5,1}
run python -m eval.sweep --config launch/configs/demo_sft_distill.yaml --out "$OUT/sft-on-policy" "${FAST[@]}" \
  --losses kl,tail --top-k 10 --beta 1 --on-policy "$ON_POLICY" --seeds 0,1,2 \
  --set train.max_steps=100 --set on_policy.max_new_tokens=48 \
  --math-data "$DEMO/data/sft/eval.jsonl" --math-examples 50 --eval-batches 16 \
  --launcher-args "--num_gpus $NUM_PROCS" "$@"
echo "Reports: $OUT/pretrain/report.md, $OUT/sft/report.md and $OUT/sft-on-policy/report.md"
