"""Random-weight stand-ins of the paper's pair with fewer layers, for a first run on one GPU.

    python benchmarks/gpu_models.py --out DIR [--teacher-layers 4] [--student-layers 6] [--tokenizer DIR]

Writes ``DIR/teacher`` (launch/configs/models/gemma2_9b.json, bf16 weights, a Hugging Face
directory) and ``DIR/student.json`` (launch/configs/models/gemma2_1b.json), each with
``num_hidden_layers`` cut as asked; widths, heads, the 256,000-row vocabulary, soft-capping and
the sliding window stay the 9B / 1B values, so a step's logits, loss and per-layer memory are the
production pair's. The tokenizer (e.g. the demo's) is saved beside the teacher: its ids are a
prefix of the 256k rows, the rest are padding columns the job masks.
"""

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cut(path: str, layers: int):
    """The config at ``path`` with ``layers`` layers, built anew so that its alternating
    sliding-window / global layer pattern is derived for that depth."""
    import json

    from transformers import AutoConfig

    with open(path) as handle:
        fields = json.load(handle)
    fields.pop("architectures", None)
    fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "runs/demo/tokenizer"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = os.path.join(ROOT, "launch/configs/models")
    os.makedirs(args.out, exist_ok=True)
    student = _cut(os.path.join(models, "gemma2_1b.json"), args.student_layers)
    student.to_json_file(os.path.join(args.out, "student.json"))
    teacher = _cut(os.path.join(models, "gemma2_9b.json"), args.teacher_layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(teacher, dtype=torch.bfloat16)
    model.save_pretrained(os.path.join(args.out, "teacher"))
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(os.path.join(args.out, "teacher"))
    print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters (tied), "
          f"{args.teacher_layers} of 42 layers -> {os.path.join(args.out, 'teacher')}")
    print(f"student: {args.student_layers} of 18 layers -> {os.path.join(args.out, 'student.json')}")


if __name__ == "__main__":
    main()
