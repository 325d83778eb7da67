"""The paper's comparison in one command: train a student per loss × hyper-parameters × seed (× teacher),
evaluate every one against its teacher, and report means, spreads and paired tests against KL.

    python -m eval.sweep --config launch/configs/demo_distill.yaml --losses ce,kl,reverse_kl,tail,topk_bucket \\
        --top-k 5,10 --beta 1,2 [--beta-mode constant,sequence] --temperature 1 [--on-policy 0,0.5,1] \\
        --seeds 0,1,2 --out DIR [--teachers NAME=PATH,...] [--set key=value]... [--launcher-args "--num_gpus 2"] \\
        [--math-data SFT_EVAL.jsonl] [--quick]

Settings: ``ce`` and ``reverse_kl`` once per seed, ``kl-t<T>`` per temperature, ``topk_bucket-k<K>-t<T>``
per K × temperature, ``tail-k<K>-b<B>-t<T>`` per K × β × temperature, and with ``--beta-mode`` per β
mode too (``sequence`` ones named ``...-seq``; without it, the config's mode and no suffix), and with
``--on-policy`` per on-policy fraction λ (``on_policy.fraction``; every name ends ``-op<λ>``: ``kl-t1-op0.5``;
without it, the config's λ and no suffix); a kind whose loss reads no teacher (``ce``, and ``miniplm``,
which trains ce) learns the data's own tokens, which the job refuses on-policy, so it runs at λ 0 only
(``ce-op0``), and the sweep says so;
``--top-k 5,10,20,50,100`` is the paper's K ablation. :data:`SWEEP_ONLY` names settings that are no
registry kind (a kind trained on other inputs): ``miniplm`` trains ce on the ``--miniplm-keep`` of
``data.train``'s raw documents that ``data.miniplm`` selects with the teacher and a reference model
(``--miniplm-reference``, trained once into ``DIR/miniplm/reference``). Each run trains with the
deepspeed launcher (``--launcher-args`` go to it: a hostfile runs the sweep on a cluster) into
``DIR/<setting>/seed<S>`` (``DIR/<teacher>/<setting>/seed<S>`` with ``--teachers``, each teacher
distilled into the same students; ``ce``, which reads no teacher, trained under the first only), the sweep owning ``output_dir``, ``seed``, the ``loss.*`` keys it
varies and, with ``--teachers``, ``teacher.path``, with ``--on-policy``, ``on_policy.fraction`` (set only
where λ > 0: a λ 0 run is the run without the flag) (every other key: the config and ``--set``, the
same for every run); then ``eval.evaluate`` scores its exported student against its teacher on the config's eval
data (``--math-data`` adds ``math_accuracy``), with the metric's K and β the config's. Writes
``DIR/summary.json``, ``DIR/report.md`` (``eval.report.write_sweep_report``) and a plot per metric.

Restartable: a run whose evaluation and export exist is skipped (its directory is its setting's
name, so runs at different λ never take each other's place); an interrupted one resumes from
its checkpoint. A failed run is reported with its log's last error and the others go on (exit 1).
``--quick``: its own tiny teacher and data, a few steps (a test runs it); it fills in kl and tail, K 5,
β 2 and seed 0 where ``--losses``, ``--top-k``, ``--beta`` or ``--seeds`` are not given.

Modules: this one the grid, the runs and the report's numbers; ``eval.sweep_miniplm`` the miniplm
setting (reference, selection, their cost); ``eval.sweep_runs`` what both share (teachers, the
sweep-only registry, logged and timed commands).
"""

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from typing import List, Optional

from core.cli import run_main
from core.errors import ConfigError
from eval import sweep_runs as runs
from eval.report import mean_std, paired_difference, teacher_comparison, write_sweep_report
from eval.sweep_miniplm import check_reference, miniplm_costs, text_corpus
from eval.sweep_runs import ROOT, SWEEP_ONLY, SweepOnly, Teacher  # noqa: F401 (SweepOnly: importable from here)

METRICS = ("nll", "perplexity", "forward_kl", "top1_agreement", "full_ece", "top1_ece", "nll_frequent", "nll_middle",
           "nll_rare", "full_ece_rare", "nll_rare_sequences", "math_accuracy")
"""Reported per setting, named as eval.evaluate writes them (math_accuracy where --math-data is given)."""
_OWNED = ("output_dir", "seed", "loss.kind", "loss.top_k", "loss.beta", "loss.temperature")
"""Config keys the sweep always sets; ``loss.beta_mode``, ``teacher.path`` and ``on_policy.fraction`` too
where ``--beta-mode``, ``--teachers`` and ``--on-policy`` are given."""


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
    beta_mode: Optional[str] = None
    teacher: Optional[Teacher] = None
    """None: the config's ``teacher.path``, and the sweep's directory has no teacher level."""
    sweep_only: Optional[str] = None
    """The :data:`SWEEP_ONLY` name this setting trains (as ``kind``), else None."""
    on_policy: Optional[float] = None
    """λ, its ``on_policy.fraction`` (set only where > 0); None: no ``--on-policy``, the config's λ and
    no ``-op`` suffix."""

    def _swept(self):
        """``(key, value)`` of each value the sweep sets, in :data:`_AXES`' order."""
        return [(key, getattr(self, key)) for key in _AXES if getattr(self, key) is not None]

    @property
    def name(self) -> str:
        """The kind, then each value set, tagged, ``-seq`` for β mode sequence and ``-op<λ>`` with
        ``--on-policy``: ``tail-k5-b2-t1``, ``tail-k5-b2-t1-seq``, ``kl-t1``, ``ce``, ``miniplm``,
        ``tail-k5-b2-t1-seq-op0.5``, ``kl-t1-op1``, ``ce-op0``."""
        tags = [_AXES[key][0] + _AXES[key][1](value) for key, value in self._swept()]
        tags += ["seq"] if self.beta_mode == "sequence" else []
        tags += [f"op{_number(self.on_policy)}"] if self.on_policy is not None else []
        return "-".join([self.sweep_only or self.kind] + tags)

    @property
    def path(self) -> str:
        """Its directory under the sweep's: ``<setting>``, or ``<teacher>/<setting>`` with ``--teachers``."""
        return os.path.join(self.teacher.name, self.name) if self.teacher else self.name

    def overrides(self, args: Optional[argparse.Namespace] = None) -> List[str]:
        """Its ``--set`` items; ``args`` (the sweep's) for a sweep-only setting's own."""
        out = [f"loss.kind={self.kind}"] + [f"loss.{key}={value}" for key, value in self._swept()]
        out += [f"loss.beta_mode={self.beta_mode}"] if self.beta_mode else []
        out += [f"teacher.path={self.teacher.path}"] if self.teacher else []
        out += [f"on_policy.fraction={self.on_policy}"] if self.on_policy else []  # λ 0: the run as without it
        return out + (SWEEP_ONLY[self.sweep_only].overrides(args, self.teacher) if self.sweep_only else [])


def off_policy_only(name: str) -> bool:
    """Whether the ``--losses`` value ``name`` (a registry kind or a :data:`SWEEP_ONLY` name) trains on
    the data's own tokens: its loss reads no teacher (``ce``; ``miniplm`` trains ce), so there is
    nothing to score the student's samples and the job config refuses it ``on_policy.fraction`` > 0
    (``training.config``'s rule, on the same registry property)."""
    from loss.registry import LOSSES

    return not LOSSES[SWEEP_ONLY[name].kind if name in SWEEP_ONLY else name].needs_teacher


def _on_policy_axis(name: str, on_policy) -> list:
    """The λ values ``name`` is trained at: ``[None]`` without ``--on-policy``, ``[0.0]`` for an
    :func:`off_policy_only` one, else ``on_policy``."""
    if on_policy is None:
        return [None]
    return [0.0] if off_policy_only(name) else list(on_policy)


def settings(losses, top_ks, betas, temperatures, beta_modes=None, teachers=None, on_policy=None) -> List[Setting]:
    """Every combination the sweep trains, in a stable order: per teacher (``teachers``; None: the
    config's), per kind, K where it uses it, β × β mode (``beta_modes``; None: the config's) where it
    uses them and × temperature where the comparison varies it (:data:`loss.registry.LOSSES`), else
    once; a :data:`SWEEP_ONLY` name once; each of those × λ (``on_policy``; None: the config's), λ
    innermost so that a setting's λ values stand together, an :func:`off_policy_only` one at λ 0 only."""
    from loss.registry import LOSSES

    out = []
    for teacher, kind in itertools.product(teachers or [None], losses):
        if kind in SWEEP_ONLY:
            out += [Setting(SWEEP_ONLY[kind].kind, teacher=teacher, sweep_only=kind, on_policy=fraction)
                    for fraction in _on_policy_axis(kind, on_policy)]
            continue
        if kind not in LOSSES:
            raise ConfigError(f"--losses: unknown {kind!r}; expected some of {', '.join([*LOSSES, *SWEEP_ONLY])}")
        entry = LOSSES[kind]
        axes = {"top_k": top_ks} if entry.uses_top_k else {}
        axes.update({"beta": betas} if entry.uses_beta else {})
        axes.update({"temperature": temperatures} if entry.compare_temperatures else {})
        axes.update({"beta_mode": beta_modes} if entry.uses_beta and beta_modes else {})
        axes["on_policy"] = _on_policy_axis(kind, on_policy)
        out += [Setting(kind, teacher=teacher, **dict(zip(axes, values)))
                for values in itertools.product(*axes.values())]
    return out


def off_policy_note(losses, on_policy) -> Optional[str]:
    """The line the sweep prints where ``--on-policy`` asks for some λ > 0 and ``losses`` has
    :func:`off_policy_only` values (run at λ 0 only), else None."""
    held = [name for name in losses if off_policy_only(name)]
    if not held or not any(on_policy or ()):
        return None
    return (f"sweep: on-policy (on_policy.fraction > 0) is refused by the job for {', '.join(held)} (trained on "
            f"the data's own tokens, which no teacher scores): run at λ 0 only (named ...-op0), not at "
            f"{', '.join(_number(value) for value in on_policy if value)}")


def _csv(kind):
    def parse(text):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


# ---------------------------------------------------------------------------------------------
# Running


def _done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "eval.json")) and os.path.isfile(
        os.path.join(run_dir, "student", "config.json"))


def trained_twin(args, setting: Setting, seed: int) -> Optional[str]:
    """The run directory whose student this run takes instead of training its own, or None: with
    ``--teachers``, a registry kind whose loss reads no teacher (``ce``) is trained under the first
    teacher only, since the same seed, data and schedule give the same student bit for bit (the
    teacher changes only its evaluation); a sweep-only setting's data may depend on the teacher."""
    from loss.registry import LOSSES

    if setting.teacher is None or setting.sweep_only or LOSSES[setting.kind].needs_teacher:
        return None
    first = args.teachers[0]
    if setting.teacher == first:
        return None
    return os.path.join(args.out, replace(setting, teacher=first).path, f"seed{seed}")


def _train(run_dir: str, args, setting: Setting, seed: int, log: str, env: dict) -> Optional[str]:
    """Train the run's student (resuming where a checkpoint exists), or copy its :func:`trained_twin`'s
    (trained first: the twin's teacher comes first in the grid); the error, or None."""
    twin = trained_twin(args, setting, seed)
    if twin is not None:
        if not os.path.isfile(os.path.join(twin, "student", "config.json")):
            return f"training failed: the student of {twin}, which this run shares, is missing"
        shutil.rmtree(os.path.join(run_dir, "student"), ignore_errors=True)
        shutil.copytree(os.path.join(twin, "student"), os.path.join(run_dir, "student"))
        return None
    overrides = args.overrides + setting.overrides(args) + [f"output_dir={run_dir}", f"seed={seed}"]
    command = runs.distill_command(args.launcher_args, args.config, overrides)
    began = time.monotonic()
    code = runs.run_logged(command, log, env)
    runs.add_train_seconds(run_dir, time.monotonic() - began)
    if code != 0 or not os.path.isfile(os.path.join(run_dir, "student", "config.json")):
        return f"training failed: {runs.last_error(log)}"
    return None


def train_and_evaluate(run_dir: str, args, setting: Setting, seed: int, cfg) -> Optional[str]:
    """Train (:func:`_train`) and evaluate one run; the error, or None."""
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "sweep.log")
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning")}
    error = _train(run_dir, args, setting, seed, log, env)
    if error:
        return error
    teacher = setting.teacher.path if setting.teacher else cfg.teacher.path
    evaluate = [sys.executable, "-m", "eval.evaluate", "--model", os.path.join(run_dir, "student"), "--teacher",
                teacher, "--data", args.eval_data, "--out", os.path.join(run_dir, "eval.json.partial"),
                "--top-k", str(cfg.loss.top_k), "--beta", str(cfg.loss.beta), "--max-batches", str(args.eval_batches)]
    if os.path.isfile(os.path.join(cfg.data.train, "manifest.json")):  # the config's prepared corpus: its token
        evaluate += ["--train-data", cfg.data.train]  # counts band the tail metrics alike for every setting
    if args.math_data:
        evaluate += ["--math-data", args.math_data, "--math-examples", str(args.math_examples),
                     "--max-new-tokens", "64"]
    if runs.run_logged(evaluate, log, env) != 0:
        return f"evaluation failed: {runs.last_error(log)}"
    os.replace(os.path.join(run_dir, "eval.json.partial"), os.path.join(run_dir, "eval.json"))
    return None


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def _prepare_once(prepared: dict, args, cfg, setting: Setting) -> Optional[str]:
    """The error of a sweep-only setting's ``prepare`` for its teacher, run on first need and kept in
    ``prepared``; None for other settings."""
    entry = SWEEP_ONLY[setting.sweep_only] if setting.sweep_only else None
    if entry is None or entry.prepare is None:
        return None
    key = (setting.sweep_only, setting.teacher)
    if key not in prepared:
        print(f"sweep: preparing the inputs of {setting.path}", file=sys.stderr, flush=True)
        prepared[key] = entry.prepare(args, cfg, setting.teacher)
    return prepared[key]


def run_sweep(args, cfg, grid: List[Setting]) -> dict:
    """Train and evaluate every (setting, seed) not done yet; ``{(setting.path, seed): error}`` of failures."""
    runs = [(setting, seed) for setting in grid for seed in args.seeds]
    failures, durations, started, prepared = {}, [], time.monotonic(), {}
    for index, (setting, seed) in enumerate(runs, start=1):
        run_dir = os.path.join(args.out, setting.path, f"seed{seed}")
        if _done(run_dir):
            print(f"sweep: run {index}/{len(runs)} {setting.path} seed {seed}: done already, skipped", file=sys.stderr)
            continue
        left = len(runs) - index + 1
        eta = f", about {_duration(left * sum(durations) / len(durations))} left" if durations else ""
        print(f"sweep: run {index}/{len(runs)} {setting.path} seed {seed} (elapsed "
              f"{_duration(time.monotonic() - started)}{eta})", file=sys.stderr, flush=True)
        began = time.monotonic()
        error = _prepare_once(prepared, args, cfg, setting) or train_and_evaluate(run_dir, args, setting, seed, cfg)
        durations.append(time.monotonic() - began)
        if error:
            failures[(setting.path, seed)] = error
            print(f"sweep: run {index}/{len(runs)} {setting.path} seed {seed} FAILED: {error} "
                  f"(log: {os.path.join(run_dir, 'sweep.log')})", file=sys.stderr, flush=True)
    return failures


# ---------------------------------------------------------------------------------------------
# Reporting


def _read_results(out_dir: str, grid: List[Setting], seeds: List[int]) -> dict:
    """``{(setting.path, seed): metrics}`` of every run whose eval.json exists."""
    results = {}
    for setting, seed in itertools.product(grid, seeds):
        path = os.path.join(out_dir, setting.path, f"seed{seed}", "eval.json")
        if os.path.isfile(path):
            with open(path) as handle:
                results[(setting.path, seed)] = json.load(handle)["metrics"]
    return results


def _paired_against(values: dict, results: dict, setting: Setting, reference: Optional[Setting], metric: str):
    """``values`` (``{seed: value}`` of ``setting``'s ``metric``) minus ``reference``'s, paired by seed
    (:func:`eval.report.paired_difference`); None without a reference other than the setting itself,
    or under 2 common seeds (no spread, no test)."""
    if reference is None or reference == setting:
        return None
    theirs = {seed: metrics[metric] for (path, seed), metrics in results.items()
              if path == reference.path and metric in metrics}
    paired = paired_difference(values, theirs)
    return paired if len(paired["seeds"]) > 1 else None


def summarise(out_dir: str, grid: List[Setting], seeds: List[int], failures: dict, beta_mode: str = "constant",
              on_policy: float = 0.0) -> dict:
    """``summary.json``'s content from the runs' eval.json files (failed or missing runs left out).
    ``beta_mode`` and ``on_policy`` (λ): the config's, reported for the settings that do not set them.
    Per metric, ``vs_kl``: the difference against kl at temperature 1 with the same teacher and λ;
    ``vs_off_policy``: against the same setting at λ 0 (settings at λ > 0 in an ``--on-policy`` grid
    with 0, else None)."""
    from loss.registry import BASELINE, LOSSES

    results = _read_results(out_dir, grid, seeds)
    references = {(s.teacher, s.on_policy): s for s in reversed(grid)
                  if s.kind == BASELINE and s.temperature == 1.0 and s.sweep_only is None}
    summary = {"settings": [], "failed": [{"setting": path, "seed": seed, "error": error}
                                          for (path, seed), error in sorted(failures.items())]}
    for setting in grid:
        done = [seed for seed in seeds if (setting.path, seed) in results]
        mode = setting.beta_mode or beta_mode if LOSSES[setting.kind].uses_beta else None
        entry = {"name": setting.name, "group": replace(setting, on_policy=None).name, "kind": setting.kind,
                 "top_k": setting.top_k, "beta": setting.beta, "temperature": setting.temperature, "beta_mode": mode,
                 "on_policy": on_policy if setting.on_policy is None else setting.on_policy,
                 "teacher": setting.teacher.name if setting.teacher else None,
                 "runs": [os.path.join(setting.path, f"seed{seed}") for seed in done], "seeds": done, "metrics": {}}
        reference = references.get((setting.teacher, setting.on_policy))
        off_policy = replace(setting, on_policy=0.0) if setting.on_policy else None
        off_policy = off_policy if off_policy in grid else None
        for metric in METRICS:
            values = {seed: results[(setting.path, seed)][metric] for seed in done
                      if metric in results[(setting.path, seed)]}
            if not values:
                continue
            mean, std = mean_std(list(values.values()))
            entry["metrics"][metric] = {"mean": mean, "std": std, "values": list(values.values()),
                                        "vs_kl": _paired_against(values, results, setting, reference, metric),
                                        "vs_off_policy": _paired_against(values, results, setting, off_policy, metric)}
        seconds = [runs.train_seconds(os.path.join(out_dir, run)) for run in entry["runs"]]
        entry["train_seconds"] = mean_std([s for s in seconds if s is not None])[0]
        summary["settings"].append(entry)
    summary["teacher_comparison"] = teacher_comparison(summary["settings"], METRICS)
    summary["miniplm"] = miniplm_costs(out_dir, grid)
    return summary


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
        steps.append(runs.distill_command(launcher_args, "launch/configs/demo_teacher.yaml", [
            f"output_dir={assets}/teacher", f"tokenizer={assets}/tokenizer", f"student.config={tiny}",
            f"data.train={assets}/prepared-train", f"data.eval={assets}/prepared-eval", "train.max_steps=30",
            "train.warmup_steps=2", "checkpoint.every=1000", "eval.every=0"]))
        log = os.path.join(assets, "assets.log")
        for command in steps:
            if runs.run_logged(command, log) != 0:
                raise ConfigError(f"--quick: building the tiny teacher failed: {runs.last_error(log)} (log: {log})")
    return [f"teacher.path={assets}/teacher/student", f"tokenizer={assets}/tokenizer", f"student.config={tiny}",
            f"data.train={assets}/prepared-train", f"data.eval={assets}/prepared-eval", "train.max_steps=8",
            "train.warmup_steps=1", "checkpoint.every=1000", "eval.every=0", "eval.max_batches=2",
            "logging.every=4"]


def _teachers(text: str) -> List[Teacher]:
    teachers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, path = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path or name in [t.name for t in teachers]:
            raise argparse.ArgumentTypeError(f"expected NAME=PATH,... with distinct names of letters, digits, "
                                             f"'_', '.' or '-', got {item!r}")
        teachers.append(Teacher(name, path))
    return teachers


_GRID_DEFAULTS = {"top_k": [5, 10], "beta": [1.0, 2.0], "seeds": [0, 1, 2]}
"""What a grid argument not given is, besides ``--losses`` (every registry kind)."""
_QUICK = {"losses": ["kl", "tail"], "top_k": [5], "beta": [2.0], "seeds": [0]}
"""What ``--quick`` fills in for a grid argument not given."""


def resolve_grid(args: argparse.Namespace) -> argparse.Namespace:
    """Fill each grid argument the command line left out (None): :data:`_QUICK`'s with ``--quick``,
    else :data:`_GRID_DEFAULTS`' (``--losses``: every registry kind). Given ones are kept, ``--quick``
    or not."""
    from loss.registry import LOSSES

    defaults = _QUICK if args.quick else {"losses": sorted(LOSSES), **_GRID_DEFAULTS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value))
    return args


def build_parser() -> argparse.ArgumentParser:
    from loss.registry import LOSSES

    parser = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="base run config (YAML)")
    parser.add_argument("--losses", type=_csv(str),
                        help=f"loss kinds, comma-separated (default: all registry kinds, {','.join(sorted(LOSSES))})"
                             + "".join(f"; {name}: {entry.summary}" for name, entry in SWEEP_ONLY.items()))
    parser.add_argument("--top-k", type=_csv(int), help="K values for the kinds that use K (default 5,10)")
    parser.add_argument("--beta", type=_csv(float), help="β values for the kinds that use β (default 1,2)")
    parser.add_argument("--beta-mode", type=_csv(str),
                        help="β modes for the kinds that use β, e.g. constant,sequence (default: the config's; "
                             "sequence settings are named ...-seq)")
    parser.add_argument("--temperature", type=_csv(float), default=[1.0], help="temperatures for kl, tail, topk_bucket")
    parser.add_argument("--on-policy", type=_csv(float), metavar="λ,...",
                        help="on-policy fractions λ in [0, 1] (on_policy.fraction), a grid dimension: every setting "
                             "named ...-op<λ>; ce and miniplm (no teacher scores their tokens) at λ 0 only "
                             "(default: the config's λ, names without -op)")
    parser.add_argument("--seeds", type=_csv(int), help="default 0,1,2")
    parser.add_argument("--teachers", type=_teachers, metavar="NAME=PATH,...",
                        help="teachers, each distilled into the same students: runs go to DIR/<NAME>/<setting>/seed<S> "
                             "(default: the config's teacher.path, runs in DIR/<setting>/seed<S>)")
    parser.add_argument("--out", required=True, help="the sweep's directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable)")
    parser.add_argument("--launcher-args", default="--num_gpus 2", help="passed to the deepspeed launcher")
    parser.add_argument("--math-data", help="JSONL word problems: adds math_accuracy to every evaluation")
    parser.add_argument("--math-examples", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=0, help="evaluation batches per rank (0: all)")
    parser.add_argument("--miniplm-reference", default="launch/configs/demo_miniplm_reference.yaml",
                        help="run config of MiniPLM's reference model, trained once per sweep for --losses miniplm "
                             "(default: the demo's)")
    parser.add_argument("--miniplm-keep", type=float, default=0.5, help="fraction of documents miniplm keeps")
    parser.add_argument("--quick", action="store_true",
                        help="tiny teacher and data, a few steps; fills --losses kl,tail, --top-k 5, --beta 2 and "
                             "--seeds 0 where not given")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse ``--set`` of a key the sweep sets, an unknown β mode and a λ outside [0, 1] or given
    twice, naming them."""
    owned = _OWNED + (("loss.beta_mode",) if args.beta_mode else ()) + (("teacher.path",) if args.teachers else ())
    owned += ("on_policy.fraction",) if args.on_policy is not None else ()
    for override in args.overrides:
        if override.split("=", 1)[0].strip() in owned:
            raise ConfigError(f"--set {override}: the sweep sets {override.split('=', 1)[0]} itself")
    if "miniplm" in args.losses and not 0 < args.miniplm_keep <= 1:
        raise ConfigError(f"--miniplm-keep must be in (0, 1], got {args.miniplm_keep}")
    for mode in args.beta_mode or ():
        if mode not in ("constant", "sequence"):
            raise ConfigError(f"--beta-mode: unknown {mode!r}; expected some of constant, sequence")
    for index, fraction in enumerate(args.on_policy or ()):
        if not 0 <= fraction <= 1:  # NaN too
            raise ConfigError(f"--on-policy: λ (on_policy.fraction) must be in [0, 1], got {fraction}")
        if fraction in args.on_policy[:index]:
            raise ConfigError(f"--on-policy: λ {_number(fraction)} given twice (its runs would share a directory)")
    if args.on_policy == []:
        raise ConfigError("--on-policy: no λ given; expected comma-separated fractions in [0, 1], e.g. 0,0.5,1")


def _check_inputs(args: argparse.Namespace, cfg, grid: List[Setting]) -> None:
    """Before any run starts: refuse a ``--teachers`` path that does not exist and, with miniplm in the
    grid, a ``data.train`` that is not prepared text or a missing or changed ``--miniplm-reference``;
    warn once that the tail metrics will be missing where ``data.train`` is not prepared data (their
    token counts live beside it)."""
    for teacher in args.teachers or ():
        if not os.path.exists(os.path.join(ROOT, teacher.path)):
            raise ConfigError(f"--teachers {teacher.name}={teacher.path}: no such path")
    if any(setting.sweep_only == "miniplm" for setting in grid):
        text_corpus(cfg)
        check_reference(args)
    if not cfg.data.train or not os.path.isfile(os.path.join(cfg.data.train, "manifest.json")):
        print(f"sweep: warning: data.train {cfg.data.train} is not prepared data (no manifest.json): evaluations "
              "run without --train-data, so the tail metrics (nll_rare, ...) will be missing", file=sys.stderr)


def _training_data(cfg) -> dict:
    """What ``training.on_policy.check_data`` reads of the run's training data: its manifest where
    ``data.train`` is prepared, else what the job will prepare (``data.format``, ``data.seq_len``)."""
    from data.manifest import MANIFEST, read_manifest

    if cfg.data.train and os.path.isfile(os.path.join(cfg.data.train, MANIFEST)):
        return read_manifest(cfg.data.train)
    return {"format": cfg.data.format, "seq_len": cfg.data.seq_len, "packed": False}


def _check_on_policy_configs(args: argparse.Namespace, cfg, grid: List[Setting]) -> None:
    """Before any run starts, with ``--on-policy``: refuse a config that sets ``on_policy.fraction``
    itself (its λ 0 runs, which set nothing, would take it), then load each λ > 0 setting's config as
    its run will (the config, ``--set`` and the setting's own keys), so that the job's refusals
    on-policy (``loss.ce_weight`` > 0, continuations that do not fit the data's rows, packed SFT
    rows, ...) stop the sweep once, by name, instead of failing every such run."""
    from training.config import load_config
    from training.on_policy import check_data

    if args.on_policy is not None and cfg.on_policy.fraction != 0:
        raise ConfigError(f"--on-policy: {args.config} sets on_policy.fraction {cfg.on_policy.fraction}, which its "
                          "λ 0 runs would train with; remove it from the config (the sweep sets λ)")
    for setting in grid:
        if setting.on_policy:
            try:
                run_cfg = load_config(args.config, args.overrides + setting.overrides(args))
                check_data(run_cfg.on_policy, _training_data(run_cfg))
            except ConfigError as error:
                raise ConfigError(f"--on-policy: {setting.path}'s runs would be refused: {error}") from error


def main(argv=None) -> int:
    args = resolve_grid(build_parser().parse_args(argv))
    _check_arguments(args)
    os.makedirs(args.out, exist_ok=True)
    if args.quick:
        args.overrides = _quick_assets(args.out, args.launcher_args) + args.overrides
    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    if (cfg.teacher.path is None and not args.teachers) or cfg.data.eval is None:
        raise ConfigError("teacher.path (or --teachers) and data.eval: the sweep evaluates every student against its "
                          "teacher on data.eval; set both")
    args.eval_data = cfg.data.eval
    grid = settings(args.losses, args.top_k, args.beta, args.temperature, args.beta_mode, args.teachers,
                    args.on_policy)
    _check_inputs(args, cfg, grid)
    _check_on_policy_configs(args, cfg, grid)
    note = off_policy_note(args.losses, args.on_policy)
    if note:
        print(note, file=sys.stderr)
    failures = run_sweep(args, cfg, grid)
    summary = summarise(args.out, grid, args.seeds, failures, cfg.loss.beta_mode, cfg.on_policy.fraction)
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    command = "python -m eval.sweep " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_sweep_report(args.out, summary, METRICS, args.seeds, command)
    print(f"sweep: {len(args.seeds) * len(grid) - len(failures)} of {len(args.seeds) * len(grid)} runs evaluated; "
          f"{os.path.join(args.out, 'report.md')}, {os.path.join(args.out, 'summary.json')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
