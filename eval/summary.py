"""A short table of the last evaluation of one or more runs, read from their metrics.jsonl.

    python -m eval.summary RUN_DIR [RUN_DIR ...]
"""

import argparse
import sys

from eval.report import read_run

COLUMNS = ("eval/loss", "eval/nll", "eval/perplexity", "eval/tail_divergence", "eval/top1_agreement", "eval/full_ece")


def last_eval(run_dir: str) -> dict:
    """The run's last eval/* scalars, with the step they were logged at (empty without evals)."""
    run = read_run(run_dir)
    steps = [points[-1][0] for name, points in run["curves"].items() if name.startswith("eval/")]
    return {"step": max(steps), **run["final"]} if steps else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.summary", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="launch.distill output directories")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        rows.append((run, last_eval(run)))
    width = max(len(run) for run, _ in rows)
    print(f"{'run':<{width}}  {'step':>5}  " + "  ".join(f"{c.removeprefix('eval/'):>16}" for c in COLUMNS))
    for run, record in rows:
        cells = [f"{record[c]:>16.4g}" if c in record else f"{'-':>16}" for c in COLUMNS]
        print(f"{run:<{width}}  {record.get('step', '-'):>5}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    from core.cli import run_main

    sys.exit(run_main(main, user_errors=(FileNotFoundError,)))
