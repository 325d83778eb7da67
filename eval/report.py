"""Compare runs: a markdown table and PNG plots from their metrics.jsonl, config.yaml and eval bins.

    python -m eval.report RUN_DIR [RUN_DIR ...] --out DIR

Writes ``DIR/report.md`` (one row per run: loss kind, K, β, final eval metrics), one PNG per metric
with the runs' curves overlaid (``DIR/<metric>.png``, train and eval scalars), and a reliability
diagram of each run's last evaluation (``DIR/reliability.png``, from ``eval_bins.json``).

:func:`write_sweep_report` writes ``eval.sweep``'s report from its summary (means, spreads, paired
differences against kl, with ``--on-policy`` a λ column, differences against λ 0 and a table of
each setting by λ, and, with several teachers, :func:`teacher_comparison`).
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


# ---------------------------------------------------------------------------------------------
# eval.sweep's report: summary.json's numbers as tables and plots


def mean_std(values):
    """Mean and standard deviation (ddof 1; None for one value) of a list; (None, None) if empty."""
    import numpy as np

    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def finite_or_none(value):
    return None if value is None or value != value else float(value)


def paired_difference(ours_by_seed: dict, theirs_by_seed: dict) -> dict:
    """The paired difference ours − theirs over the seeds both have (``{seed: value}`` each): its
    ``mean`` and ``std`` (:func:`mean_std`), ``scipy.stats.ttest_rel``'s ``p_value`` (None under 2
    common seeds), the common ``seeds`` in order and the per-seed difference ``values``."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(ours_by_seed) & set(theirs_by_seed))
    ours, theirs = [ours_by_seed[seed] for seed in seeds], [theirs_by_seed[seed] for seed in seeds]
    values = [a - b for a, b in zip(ours, theirs)]
    mean, std = mean_std(values)
    p_value = finite_or_none(ttest_rel(ours, theirs).pvalue) if len(seeds) > 1 else None
    return {"mean": mean, "std": std, "p_value": p_value, "seeds": seeds, "values": values}


def teacher_comparison(settings, metrics) -> list:
    """Whether a setting's paired difference against kl changes with the teacher, from summary.json's
    ``settings`` (entries with a ``teacher``): for each setting name trained with more than one
    teacher and each of ``metrics`` that every one of its teachers has a ``vs_kl`` for, each
    teacher's difference (mean, spread, p-value) and, for each teacher after the first, the change
    ``d_T(s) − d_first(s)`` of the per-seed differences, paired by seed (a seed's students start
    from the same weights and, but for miniplm, see the same batches under either teacher):
    :func:`paired_difference`'s."""
    by_name = {}
    for entry in settings:
        if entry.get("teacher") is not None:
            by_name.setdefault(entry["name"], []).append(entry)
    rows = []
    for name, entries in by_name.items():
        for metric in metrics if len(entries) > 1 else ():
            diffs = [(entry["metrics"].get(metric) or {}).get("vs_kl") for entry in entries]
            if any(diff is None for diff in diffs):
                continue
            first = dict(zip(diffs[0]["seeds"], diffs[0]["values"]))
            row = {"setting": name, "metric": metric, "first": entries[0]["teacher"],
                   "teachers": {entry["teacher"]: {key: diff[key] for key in ("mean", "std", "p_value")}
                                for entry, diff in zip(entries, diffs)}, "changes": {}}
            for entry, diff in zip(entries[1:], diffs[1:]):
                row["changes"][entry["teacher"]] = paired_difference(dict(zip(diff["seeds"], diff["values"])), first)
            rows.append(row)
    return rows


def _cell(stats) -> str:
    if stats is None or stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.4g}" + (f" ± {stats['std']:.2g}" if stats["std"] is not None else "")


def _difference(stats) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    spread = f" ± {stats['std']:.2g}" if stats["std"] is not None else ""
    p = f" (p {stats['p_value']:.3g})" if stats["p_value"] is not None else ""
    return f"{stats['mean']:+.3g}{spread}{p}"


def _label(setting) -> str:
    return f"{setting['teacher']}/{setting['name']}" if setting.get("teacher") else setting["name"]


def _teacher_section(rows) -> list:
    """report.md's lines on :func:`teacher_comparison`'s rows (none without them)."""
    if not rows:
        return []
    teachers = list(rows[0]["teachers"])
    lines = ["## Does setting − kl change with the teacher?", "",
             f"Per teacher, the paired difference setting − kl (that teacher's kl, same seed) as above; *change*: "
             f"the difference under each later teacher minus under {rows[0]['first']}, paired by seed (a seed's "
             "students start from the same weights and see the same batches under either teacher), mean ± spread "
             "and `scipy.stats.ttest_rel` p-value: a small p says the gap to kl depends on the teacher. Not so "
             "for miniplm: its data differ per teacher (the selection is made with each teacher), so its change "
             "mixes the teacher and the data.", "",
             "| setting | metric | " + " | ".join(f"{t}: − kl" for t in teachers) + " | " +
             " | ".join(f"change {t}" for t in teachers[1:]) + " |",
             "| --- | --- |" + " ---: |" * (2 * len(teachers) - 1)]
    for row in rows:
        cells = [_difference(row["teachers"].get(t)) for t in teachers]
        cells += [_difference(row["changes"].get(t)) for t in teachers[1:]]
        lines.append(f"| {row['setting']} | {row['metric']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cost_section(summary) -> list:
    """report.md's lines on each setting's training seconds and MiniPLM's selection beside them."""
    timed = [s for s in summary["settings"] if s.get("train_seconds") is not None]
    if not timed:
        return []
    lines = ["## Cost", "", "Seconds of a run's training command (launcher start-up included), mean over its runs; "
             "every setting trains the same steps on the same batch size.", "",
             "| setting | train s per run |", "| --- | ---: |"]
    lines += [f"| {_label(s)} | {s['train_seconds']:.0f} |" for s in timed]
    per_run = {_label(s): s["train_seconds"] for s in timed}
    for made in summary.get("miniplm", []):
        score, counts = made["scoring"], made["counts"]
        reference = made["reference_train_seconds"] or 0.0
        total = reference + score["teacher"]["seconds"] + score["reference"]["seconds"]
        ratio = f" ({total / per_run[made['setting']]:.2g}× one of its runs)" if per_run.get(made["setting"]) else ""
        lines += ["", f"{made['setting']}'s selection, made once for all its seeds: training the reference "
                  f"{reference:.0f} s; scoring {counts['documents']} documents ({counts['tokens']} tokens) on "
                  f"{score['device']}: teacher {score['teacher']['seconds']:.1f} s "
                  f"({score['teacher']['flops_estimate']:.3g} FLOPs), reference {score['reference']['seconds']:.1f} s "
                  f"({score['reference']['flops_estimate']:.3g} FLOPs); {total:.0f} s in all{ratio}. FLOPs are "
                  f"estimates (2 · parameters · tokens). Kept {counts['documents_kept']} documents "
                  f"({counts['tokens_kept']} tokens; keep {made['keep']:g})."]
    return lines + [""]


def _on_policy(settings) -> list:
    """The λ values of an ``--on-policy`` sweep's settings, ascending, or [] where every setting is at
    λ 0 (or has no ``on_policy``: a summary from before the dimension): no λ column, no table by λ."""
    values = sorted({setting["on_policy"] for setting in settings if setting.get("on_policy") is not None})
    return values if any(values) else []


def _by_on_policy(settings, metric: str, fractions) -> list:
    """report.md's table of ``metric`` with a row per setting without its λ (summary.json's ``group``,
    teacher-qualified) and a column per λ: mean ± std over seeds, – where that λ was not trained."""
    rows = {}
    for setting in settings:
        label = f"{setting['teacher']}/{setting['group']}" if setting.get("teacher") else setting["group"]
        rows.setdefault(label, {})[setting["on_policy"]] = setting["metrics"].get(metric)
    lines = ["By on-policy fraction λ (mean ± std over seeds):", "",
             "| setting | " + " | ".join(f"λ {value:g}" for value in fractions) + " |",
             "| --- |" + " ---: |" * len(fractions)]
    lines += [f"| {label} | " + " | ".join(_cell(cells.get(value)) for value in fractions) + " |"
              for label, cells in rows.items()]
    return lines + [""]


def _metric_section(settings, metric: str, fractions) -> list:
    """report.md's table of ``metric``: a row per setting (runs, mean ± std, vs kl) and, in an
    ``--on-policy`` sweep (``fractions``), its λ and its difference against λ 0, then the table by λ."""
    on_policy = bool(fractions)
    header = ["setting"] + (["λ"] if on_policy else []) + ["runs", "mean ± std", "vs kl"] + (
        ["vs λ 0"] if on_policy else [])
    lines = [f"## {metric}", "", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for setting in settings:
        stats = setting["metrics"].get(metric) or {}
        cells = [_label(setting)] + ([f"{setting['on_policy']:g}"] if on_policy else [])
        cells += [str(len(stats.get("values", []))), _cell(stats), _difference(stats.get("vs_kl"))]
        cells += [_difference(stats.get("vs_off_policy"))] if on_policy else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + (_by_on_policy(settings, metric, fractions) if on_policy else [])
    return lines + [f"![{metric}]({metric}.png)", ""]


def _plot_sweep_metric(out_dir: str, metric: str, named) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(4.0, 0.7 * len(named) + 1.5), 3.2))
    axis.bar(range(len(named)), [s["metrics"][metric]["mean"] for s in named],
             yerr=[s["metrics"][metric]["std"] or 0.0 for s in named], capsize=3)
    axis.set_xticks(range(len(named)), [_label(s) for s in named], rotation=45, ha="right", fontsize=7)
    axis.set_ylabel(metric)
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, f"{metric}.png"), dpi=100)
    plt.close(figure)


def write_sweep_report(out_dir: str, summary: dict, metrics, seeds, command: str) -> None:
    """``report.md`` (a table per metric, with ``--on-policy`` each setting's λ and a table by λ too,
    then the teacher comparison where there is one) and ``<metric>.png`` (means with standard
    deviations) from ``eval.sweep``'s summary."""
    present = [m for m in metrics if any(m in s["metrics"] for s in summary["settings"])]
    fractions = _on_policy(summary["settings"])
    lines = ["# Sweep report", "", f"Reproduce: `{command}`", "",
             f"Mean ± standard deviation (ddof 1) over seeds {', '.join(map(str, seeds))}; *vs kl*: the paired "
             "difference setting − kl (same seed and teacher, temperature 1" + (", same λ" if fractions else "") +
             "), its mean ± spread and the paired t-test p-value (`scipy.stats.ttest_rel`)." +
             (" λ: the on-policy fraction (`on_policy.fraction`: the probability that a step trains the student on "
              "its own samples, scored by the teacher); *vs λ 0*: the paired difference against the same setting at "
              "λ 0 (same seed and teacher), likewise." if fractions else ""), ""]
    for metric in present:
        lines += _metric_section(summary["settings"], metric, fractions)
        _plot_sweep_metric(out_dir, metric, [s for s in summary["settings"] if metric in s["metrics"]])
    lines += _teacher_section(summary.get("teacher_comparison", []))
    lines += _cost_section(summary)
    if summary["failed"]:
        lines += ["## Failed runs", ""] + [f"- {f['setting']} seed {f['seed']}: {f['error']}"
                                           for f in summary["failed"]]
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


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
