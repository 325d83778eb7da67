"""Run lm-evaluation-harness (the ``lm-eval`` package) on an exported student.

    python -m eval.harness --model DIR --tasks gsm8k hellaswag [--limit N] [--num-fewshot K] [--out FILE]
    python -m eval.harness --model DIR --tasks demo_arithmetic --demo-data runs/demo/data/sft/eval.jsonl

Any task lm-eval knows works where its data set can be downloaded. ``demo_arithmetic`` is defined
here, over the demo's word problems (a local JSONL, so it runs offline): greedy generation, the
number after ``####`` compared by exact match.
"""

import argparse
import json
import sys

DEMO_TASK = "demo_arithmetic"


def demo_arithmetic_task(data_file: str, max_new_tokens: int = 128) -> dict:
    """The lm-eval task config for the demo's arithmetic problems (``{prompt, response}`` rows)."""
    return {
        "task": DEMO_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{response.split('####')[-1].strip()}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["</s>"], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [{"name": "strict-match", "filter": [
            {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": [","]}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def run_harness(model_dir: str, tasks, *, demo_data=None, limit=None, num_fewshot=None, batch_size=8,
                max_new_tokens=128) -> dict:
    """lm-eval's ``results`` dict for ``tasks`` on the Hugging Face model in ``model_dir``."""
    import lm_eval

    resolved = []
    for task in tasks:
        if task == DEMO_TASK:
            if not demo_data:
                raise ValueError(f"task {DEMO_TASK} needs --demo-data (the demo's sft/eval.jsonl)")
            resolved.append(demo_arithmetic_task(demo_data, max_new_tokens))
        else:
            resolved.append(task)
    output = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_dir, "dtype": "float32"},
                                     tasks=resolved, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                     device="cuda" if _cuda() else "cpu", log_samples=False)
    return output["results"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.harness", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (an exported student)")
    parser.add_argument("--tasks", nargs="+", required=True, help=f"lm-eval task names, or {DEMO_TASK}")
    parser.add_argument("--demo-data", help=f"JSONL of the demo's word problems, for {DEMO_TASK}")
    parser.add_argument("--limit", type=int, help="examples per task")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = run_harness(args.model, args.tasks, demo_data=args.demo_data, limit=args.limit,
                          num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    from core.cli import run_main

    sys.exit(run_main(main, user_errors=(ValueError,)))
