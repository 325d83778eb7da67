"""Compare runs: a markdown table and PNG plots from their metrics.jsonl, config.yaml and eval bins.

    python -m eval.report RUN_DIR [RUN_DIR ...] --out DIR

Writes ``DIR/report.md`` (one row per run: loss kind, K, β, final eval metrics), one PNG per metric
with the runs' curves overlaid (``DIR/<metric>.png``, train and eval scalars), and a reliability
diagram of each run's last evaluation (``DIR/reliability.png``, from ``eval_bins.json``).
"""

import argparse
import json
import os
import sys

import yaml

TABLE_METRICS = ("eval/loss", "eval/nll", "eval/perplexity", "eval/tail_divergence", "eval/forward_kl",
                 "eval/top1_agreement", "eval/full_ece", "eval/top1_ece")


def read_run(run_dir: str) -> dict:
    """Curves (``{tag: [(step, value), ...]}``), final eval scalars, config and calibration bins of
    one launch.distill output; FileNotFoundError if it has no metrics.jsonl."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{metrics_path} is missing: not a launch.distill output directory?")
    with open(metrics_path) as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    curves = {}
    for record in records:
        for name, value in record.items():
            if name != "step":  # metrics.jsonl drops the train/ prefix of TensorBoard's tags
                curves.setdefault(name if "/" in name else f"train/{name}", []).append((record["step"], value))
    config = {}
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as handle:
            config = yaml.safe_load(handle) or {}
    bins = None
    if os.path.isfile(os.path.join(run_dir, "eval_bins.json")):
        with open(os.path.join(run_dir, "eval_bins.json")) as handle:
            bins = json.load(handle)
    final = {name: points[-1][1] for name, points in curves.items() if name.startswith("eval/")}
    return {"name": os.path.basename(os.path.normpath(run_dir)), "curves": curves, "final": final,
            "config": config, "bins": bins}


def markdown_table(runs) -> str:
    """One row per run: its name, loss kind, K and β (each for a kind that uses it, else –), then
    :data:`TABLE_METRICS`' final values."""
    from loss.registry import LOSSES

    header = ["run", "loss", "K", "β"] + [m.removeprefix("eval/") for m in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        loss = run["config"].get("loss", {})
        kind = loss.get("kind", "?")
        entry = LOSSES.get(kind)
        cells = [run["name"], kind] + [str(loss.get(key, "")) if entry and getattr(entry, uses) else "–"
                                       for key, uses in (("top_k", "uses_top_k"), ("beta", "uses_beta"))]
        cells += [f"{run['final'][m]:.4f}" if m in run["final"] else "–" for m in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_curves(runs, out_dir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = sorted({name for run in runs for name in run["curves"]})
    for name in names:
        figure, axes = plt.subplots(figsize=(6, 4))
        for run in runs:
            if name in run["curves"]:
                steps, values = zip(*run["curves"][name])
                axes.plot(steps, values, marker="o" if len(steps) < 20 else None, label=run["name"])
        axes.set_xlabel("step")
        axes.set_ylabel(name)
        axes.set_title(name)
        axes.legend()
        axes.grid(alpha=0.3)
        path = os.path.join(out_dir, name.replace("/", "_") + ".png")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _plot_reliability(runs, out_dir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_bins = [run for run in runs if run["bins"]]
    if not with_bins:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, kind, title in ((axes[0], "top1", "top-1 reliability"), (axes[1], "full", "Full (all tokens)")):
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
        for run in with_bins:
            count, confidence, hits = run["bins"][kind]
            points = [(c / n, h / n) for n, c, h in zip(count, confidence, hits) if n > 0]
            if points:
                axis.plot(*zip(*points), marker="o", label=run["name"])
        axis.set_xlabel("mean confidence")
        axis.set_ylabel("observed frequency")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    path = os.path.join(out_dir, "reliability.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(run_dirs, out_dir: str) -> dict:
    runs = [read_run(run_dir) for run_dir in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(runs)
    with open(os.path.join(out_dir, "report.md"), "w") as out:
        out.write("# Runs\n\n" + table)
    plots = _plot_curves(runs, out_dir)
    reliability = _plot_reliability(runs, out_dir)
    return {"table": table, "plots": plots, "reliability": reliability}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="launch.distill output directories")
    parser.add_argument("--out", required=True, help="report directory")
    args = parser.parse_args(argv)
    report = write_report(args.runs, args.out)
    print(report["table"])
    print(f"report and {len(report['plots']) + bool(report['reliability'])} plots written to {args.out}")
    return 0


if __name__ == "__main__":
    from core.cli import run_main

    sys.exit(run_main(main, user_errors=(FileNotFoundError,)))
