"""The paper's comparison in one command: train a student per loss × hyper-parameters × seed, evaluate
every one against the same teacher, and report means, spreads and paired tests against KL.

    python -m eval.sweep --config launch/configs/demo_distill.yaml --losses ce,kl,reverse_kl,tail \\
        --top-k 5,10 --beta 1,2 --temperature 1 --seeds 0,1,2 --out DIR [--set key=value]... \\
        [--launcher-args "--num_gpus 2"] [--math-data SFT_EVAL.jsonl] [--quick]

Settings: ``ce`` and ``reverse_kl`` once per seed, ``kl-t<T>`` per temperature, ``tail-k<K>-b<B>-t<T>``
per K × β × temperature; ``--top-k 5,10,20,50,100`` is the paper's K ablation. Each run trains with
the deepspeed launcher (``--launcher-args`` go to it: a hostfile runs the sweep on a cluster) into
``DIR/<setting>/seed<S>``, the sweep owning ``output_dir`` and ``seed`` (every other key: the config
and ``--set``, the same for every run), then ``eval.evaluate`` scores its exported student against
the config's teacher on the config's eval data (``--math-data`` adds ``math_accuracy``), with the
metric's K and β the config's. Writes ``DIR/summary.json``, ``DIR/report.md`` and a plot per metric.

Restartable: a run whose evaluation and export exist is skipped; an interrupted one resumes from
its checkpoint. A failed run is reported with its log's last error and the others go on (exit 1).
``--quick``: its own tiny teacher and data, kl and tail, one seed, a few steps (a test runs it).
"""

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from core.cli import run_main
from core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("nll", "perplexity", "forward_kl", "top1_agreement", "full_ece", "top1_ece", "math_accuracy")
"""Reported per setting, named as eval.evaluate writes them (math_accuracy where --math-data is given)."""
_OWNED = ("output_dir", "seed", "loss.kind", "loss.top_k", "loss.beta", "loss.temperature")


def _number(value: float) -> str:
    return f"{value:g}"


_AXES = {"top_k": ("k", str), "beta": ("b", _number), "temperature": ("t", _number)}
"""The ``loss.*`` keys a setting may set, each with the tag and format that name it in the setting's name."""


@dataclass(frozen=True)
class Setting:
    """One loss kind and the ``loss.*`` values the sweep sets for it (None: the config's)."""

    kind: str
    top_k: Optional[int] = None
    beta: Optional[float] = None
    temperature: Optional[float] = None

    def _swept(self):
        """``(key, value)`` of each value the sweep sets, in :data:`_AXES`' order."""
        return [(key, getattr(self, key)) for key in _AXES if getattr(self, key) is not None]

    @property
    def name(self) -> str:
        """The kind, then each value set, tagged: ``tail-k5-b2-t1``, ``kl-t1``, ``ce``."""
        return "-".join([self.kind] + [_AXES[key][0] + _AXES[key][1](value) for key, value in self._swept()])

    def overrides(self) -> List[str]:
        return [f"loss.kind={self.kind}"] + [f"loss.{key}={value}" for key, value in self._swept()]


def settings(losses, top_ks, betas, temperatures) -> List[Setting]:
    """Every combination the sweep trains, in a stable order: per kind, K × β where it uses them and
    × temperature where the comparison varies it (:data:`loss.registry.LOSSES`), else once."""
    from loss.registry import LOSSES

    out = []
    for kind in losses:
        if kind not in LOSSES:
            raise ConfigError(f"--losses: unknown {kind!r}; expected some of {', '.join(LOSSES)}")
        axes = {"top_k": top_ks, "beta": betas} if LOSSES[kind].uses_top_k else {}
        if LOSSES[kind].compare_temperatures:
            axes["temperature"] = temperatures
        out += [Setting(kind, **dict(zip(axes, values))) for values in itertools.product(*axes.values())]
    return out


def _csv(kind):
    def parse(text):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


# ---------------------------------------------------------------------------------------------
# Running


def _last_error(log_path: str) -> str:
    """The log's last line that names an error, else its last non-empty line."""
    try:
        with open(log_path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "Error" in line or line.startswith("error:"):
            return line[-300:]
    return lines[-1][-300:] if lines else "empty log"


def _done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "eval.json")) and os.path.isfile(
        os.path.join(run_dir, "student", "config.json"))


def _run_logged(command: List[str], log_path: str, env=None) -> int:
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _distill_command(launcher_args: str, config: str, overrides: List[str]) -> List[str]:
    """``launch.distill`` under the deepspeed launcher, on a free local rendezvous port."""
    from model_parallel.spawn import free_port

    return (["deepspeed", *shlex.split(launcher_args), "--master_port", str(free_port()), "--module",
             "launch.distill", "--config", config] + [item for o in overrides for item in ("--set", o)])


def train_and_evaluate(run_dir: str, args, setting: Setting, seed: int, cfg) -> Optional[str]:
    """Train (resuming where a checkpoint exists) and evaluate one run; the error, or None."""
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "sweep.log")
    overrides = args.overrides + setting.overrides() + [f"output_dir={run_dir}", f"seed={seed}"]
    command = _distill_command(args.launcher_args, args.config, overrides)
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning")}
    if _run_logged(command, log, env) != 0 or not os.path.isfile(os.path.join(run_dir, "student", "config.json")):
        return f"training failed: {_last_error(log)}"
    evaluate = [sys.executable, "-m", "eval.evaluate", "--model", os.path.join(run_dir, "student"), "--teacher",
                cfg.teacher.path, "--data", args.eval_data, "--out", os.path.join(run_dir, "eval.json.partial"),
                "--top-k", str(cfg.loss.top_k), "--beta", str(cfg.loss.beta), "--max-batches", str(args.eval_batches)]
    if args.math_data:
        evaluate += ["--math-data", args.math_data, "--math-examples", str(args.math_examples),
                     "--max-new-tokens", "64"]
    if _run_logged(evaluate, log, env) != 0:
        return f"evaluation failed: {_last_error(log)}"
    os.replace(os.path.join(run_dir, "eval.json.partial"), os.path.join(run_dir, "eval.json"))
    return None


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def run_sweep(args, cfg, grid: List[Setting]) -> dict:
    """Train and evaluate every (setting, seed) not done yet; ``{(name, seed): error}`` of failures."""
    runs = [(setting, seed) for setting in grid for seed in args.seeds]
    failures, durations, started = {}, [], time.monotonic()
    for index, (setting, seed) in enumerate(runs, start=1):
        run_dir = os.path.join(args.out, setting.name, f"seed{seed}")
        if _done(run_dir):
            print(f"sweep: run {index}/{len(runs)} {setting.name} seed {seed}: done already, skipped", file=sys.stderr)
            continue
        left = len(runs) - index + 1
        eta = f", about {_duration(left * sum(durations) / len(durations))} left" if durations else ""
        print(f"sweep: run {index}/{len(runs)} {setting.name} seed {seed} (elapsed "
              f"{_duration(time.monotonic() - started)}{eta})", file=sys.stderr, flush=True)
        began = time.monotonic()
        error = train_and_evaluate(run_dir, args, setting, seed, cfg)
        durations.append(time.monotonic() - began)
        if error:
            failures[(setting.name, seed)] = error
            print(f"sweep: run {index}/{len(runs)} {setting.name} seed {seed} FAILED: {error} "
                  f"(log: {os.path.join(run_dir, 'sweep.log')})", file=sys.stderr, flush=True)
    return failures


# ---------------------------------------------------------------------------------------------
# Reporting


def _mean_std(values):
    import numpy as np

    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _finite_or_none(value):
    return None if value is None or value != value else float(value)


def summarise(out_dir: str, grid: List[Setting], seeds: List[int], failures: dict) -> dict:
    """``summary.json``'s content from the runs' eval.json files (failed or missing runs left out)."""
    from scipy.stats import ttest_rel

    results = {}
    for setting in grid:
        for seed in seeds:
            path = os.path.join(out_dir, setting.name, f"seed{seed}", "eval.json")
            if os.path.isfile(path):
                with open(path) as handle:
                    results[(setting.name, seed)] = json.load(handle)["metrics"]
    from loss.registry import BASELINE

    reference = next((s for s in grid if s.kind == BASELINE and s.temperature == 1.0), None)
    summary = {"settings": [], "failed": [{"setting": name, "seed": seed, "error": error}
                                          for (name, seed), error in sorted(failures.items())]}
    for setting in grid:
        done = [seed for seed in seeds if (setting.name, seed) in results]
        entry = {"name": setting.name, "kind": setting.kind, "top_k": setting.top_k, "beta": setting.beta,
                 "temperature": setting.temperature,
                 "runs": [os.path.join(setting.name, f"seed{seed}") for seed in done], "metrics": {}}
        for metric in METRICS:
            values = [results[(setting.name, seed)][metric] for seed in done if metric in results[(setting.name, seed)]]
            if not values:
                continue
            mean, std = _mean_std(values)
            vs_kl = None
            if reference is not None and setting != reference:
                paired = [seed for seed in done if metric in results.get((reference.name, seed), {})]
                if len(paired) >= 2:
                    ours = [results[(setting.name, seed)][metric] for seed in paired]
                    theirs = [results[(reference.name, seed)][metric] for seed in paired]
                    diff_mean, diff_std = _mean_std([a - b for a, b in zip(ours, theirs)])
                    vs_kl = {"mean": diff_mean, "std": diff_std,
                             "p_value": _finite_or_none(ttest_rel(ours, theirs).pvalue)}
            entry["metrics"][metric] = {"mean": mean, "std": std, "values": values, "vs_kl": vs_kl}
        summary["settings"].append(entry)
    return summary


def _cell(stats) -> str:
    if stats is None:
        return "–"
    return f"{stats['mean']:.4g}" + (f" ± {stats['std']:.2g}" if stats["std"] is not None else "")


def _vs_cell(stats) -> str:
    vs = stats["vs_kl"] if stats else None
    if not vs:
        return "–"
    spread = f" ± {vs['std']:.2g}" if vs["std"] is not None else ""
    p = f" (p {vs['p_value']:.3g})" if vs["p_value"] is not None else ""
    return f"{vs['mean']:+.3g}{spread}{p}"


def write_report(out_dir: str, summary: dict, seeds: List[int], command: str) -> None:
    """``report.md`` (a table per metric) and ``<metric>.png`` (means with standard deviations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m in s["metrics"] for s in summary["settings"])]
    lines = ["# Sweep report", "", f"Reproduce: `{command}`", "",
             f"Mean ± standard deviation (ddof 1) over seeds {', '.join(map(str, seeds))}; *vs kl*: the paired "
             "difference setting − kl (same seed, temperature 1), its mean ± spread and the paired t-test p-value "
             "(`scipy.stats.ttest_rel`).", ""]
    for metric in metrics:
        lines += [f"## {metric}", "", "| setting | runs | mean ± std | vs kl |", "| --- | ---: | ---: | ---: |"]
        for setting in summary["settings"]:
            stats = setting["metrics"].get(metric)
            lines.append(f"| {setting['name']} | {len(stats['values']) if stats else 0} | {_cell(stats)} | "
                         f"{_vs_cell(stats)} |")
        lines += ["", f"![{metric}]({metric}.png)", ""]
        named = [s for s in summary["settings"] if metric in s["metrics"]]
        figure, axis = plt.subplots(figsize=(max(4.0, 0.7 * len(named) + 1.5), 3.2))
        axis.bar(range(len(named)), [s["metrics"][metric]["mean"] for s in named],
                 yerr=[s["metrics"][metric]["std"] or 0.0 for s in named], capsize=3)
        axis.set_xticks(range(len(named)), [s["name"] for s in named], rotation=45, ha="right", fontsize=7)
        axis.set_ylabel(metric)
        figure.tight_layout()
        figure.savefig(os.path.join(out_dir, f"{metric}.png"), dpi=100)
        plt.close(figure)
    if summary["failed"]:
        lines += ["## Failed runs", ""] + [f"- {f['setting']} seed {f['seed']}: {f['error']}" for f in summary["failed"]]
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# --quick: a tiny teacher and data of its own


def _quick_assets(out_dir: str, launcher_args: str) -> List[str]:
    """Build demo data, a tokenizer and a tiny teacher under ``out_dir/assets``; the ``--set``
    overrides that point a sweep of a few steps at them."""
    assets = os.path.join(out_dir, "assets")
    tiny = os.path.join(assets, "tiny_student.json")
    if not os.path.isfile(os.path.join(assets, "teacher", "student", "config.json")):
        os.makedirs(assets, exist_ok=True)
        with open(os.path.join(ROOT, "launch/configs/models/demo_student.json")) as handle:
            config = json.load(handle)
        config.update(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
        with open(tiny, "w") as handle:
            json.dump(config, handle)
        python = sys.executable
        steps = [[python, "-m", "data.synthetic", "--out", f"{assets}/data", "--seed", "0", "--mb", "0.3"],
                 [python, "-m", "data.tokenizer", "--input", f"{assets}/data/pretrain/train.txt", "--vocab-size", "512",
                  "--out", f"{assets}/tokenizer"]]
        steps += [[python, "-m", "data.prepare", "--tokenizer", f"{assets}/tokenizer", "--input",
                   f"{assets}/data/pretrain/{split}.txt", "--format", "text", "--seq-len", "64", "--out",
                   f"{assets}/prepared-{split}"] for split in ("train", "eval")]
        steps.append(_distill_command(launcher_args, "launch/configs/demo_teacher.yaml", [
            f"output_dir={assets}/teacher", f"tokenizer={assets}/tokenizer", f"student.config={tiny}",
            f"data.train={assets}/prepared-train", f"data.eval={assets}/prepared-eval", "train.max_steps=30",
            "train.warmup_steps=2", "checkpoint.every=1000", "eval.every=0"]))
        log = os.path.join(assets, "assets.log")
        for command in steps:
            if _run_logged(command, log) != 0:
                raise ConfigError(f"--quick: building the tiny teacher failed: {_last_error(log)} (log: {log})")
    return [f"teacher.path={assets}/teacher/student", f"tokenizer={assets}/tokenizer", f"student.config={tiny}",
            f"data.train={assets}/prepared-train", f"data.eval={assets}/prepared-eval", "train.max_steps=8",
            "train.warmup_steps=1", "checkpoint.every=1000", "eval.every=0", "eval.max_batches=2",
            "logging.every=4"]


def build_parser() -> argparse.ArgumentParser:
    from loss.registry import LOSSES

    parser = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="base run config (YAML)")
    parser.add_argument("--losses", type=_csv(str), default=sorted(LOSSES),
                        help=f"loss kinds, comma-separated (default: all, {','.join(sorted(LOSSES))})")
    parser.add_argument("--top-k", type=_csv(int), default=[5, 10], help="K values for tail")
    parser.add_argument("--beta", type=_csv(float), default=[1.0, 2.0], help="β values for tail")
    parser.add_argument("--temperature", type=_csv(float), default=[1.0], help="temperatures for kl and tail")
    parser.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="the sweep's directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable)")
    parser.add_argument("--launcher-args", default="--num_gpus 2", help="passed to the deepspeed launcher")
    parser.add_argument("--math-data", help="JSONL word problems: adds math_accuracy to every evaluation")
    parser.add_argument("--math-examples", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=0, help="evaluation batches per rank (0: all)")
    parser.add_argument("--quick", action="store_true", help="tiny teacher and data, kl and tail, one seed")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for override in args.overrides:
        if override.split("=", 1)[0].strip() in _OWNED:
            raise ConfigError(f"--set {override}: the sweep sets {override.split('=', 1)[0]} itself")
    os.makedirs(args.out, exist_ok=True)
    if args.quick:
        args.overrides = _quick_assets(args.out, args.launcher_args) + args.overrides
        args.losses, args.top_k, args.beta, args.seeds = ["kl", "tail"], args.top_k[:1], args.beta[-1:], args.seeds[:1]
    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.teacher.path is None or cfg.data.eval is None:
        raise ConfigError("teacher.path and data.eval: the sweep evaluates every student against the teacher on "
                          "data.eval; set both")
    args.eval_data = cfg.data.eval
    grid = settings(args.losses, args.top_k, args.beta, args.temperature)
    failures = run_sweep(args, cfg, grid)
    summary = summarise(args.out, grid, args.seeds, failures)
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    write_report(args.out, summary, args.seeds, "python -m eval.sweep " + shlex.join(argv if argv is not None
                                                                                     else sys.argv[1:]))
    print(f"sweep: {len(args.seeds) * len(grid) - len(failures)} of {len(args.seeds) * len(grid)} runs evaluated; "
          f"{os.path.join(args.out, 'report.md')}, {os.path.join(args.out, 'summary.json')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
