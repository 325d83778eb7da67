#!/usr/bin/env bash
# The main job on the embedded demo, from a clean clone:  bash launch/demo.sh
# Demo data -> tokenizer -> prepared blocks -> teacher pre-training (demo_teacher.yaml, CE) ->
# distillation into a smaller student with the tail-aware divergence, TP = 2 on 2 processes
# (demo_distill.yaml) -> evaluation summary, report with plots, math accuracy of the student. Everything lands in runs/demo/ (about 5-10 minutes on
# 2 CPU cores). Extra arguments are passed to both training runs, e.g. --set train.max_steps=20.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
DEMO=runs/demo
NUM_PROCS=${NUM_PROCS:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}  # torch's deprecation notices, once per rank

python -m data.synthetic --out "$DEMO/data" --seed 0 --mb 4
python -m data.tokenizer --input "$DEMO/data/pretrain/train.txt" "$DEMO/data/sft/train.jsonl" --vocab-size 1024 \
  --out "$DEMO/tokenizer"
for split in train eval; do
  python -m data.prepare --tokenizer "$DEMO/tokenizer" --input "$DEMO/data/pretrain/$split.txt" --format text \
    --seq-len 128 --out "$DEMO/prepared/pretrain-$split" --num-proc 2
done

deepspeed --num_gpus "$NUM_PROCS" --module launch.distill --config launch/configs/demo_teacher.yaml "$@"
deepspeed --num_gpus "$NUM_PROCS" --module launch.distill --config launch/configs/demo_distill.yaml "$@"

echo
python -m eval.summary "$DEMO/teacher" "$DEMO/distill"
python -m eval.report "$DEMO/teacher" "$DEMO/distill" --out "$DEMO/report" > /dev/null
python -m eval.math --model "$DEMO/distill/student" --data "$DEMO/data/sft/eval.jsonl" --max-examples 50 \
  --max-new-tokens 64 | sed 's/^/math accuracy of the student (pre-training data only, so expect ~0): /'
cat <<MSG

Exported student (Hugging Face format): $DEMO/distill/student
Teacher used for distillation:          $DEMO/teacher/student
Curves:   tensorboard --logdir $DEMO   (then open http://localhost:6006)
Metrics:  $DEMO/distill/metrics.jsonl
Report:   $DEMO/report/report.md and $DEMO/report/*.png (curves, reliability diagram)
MSG
