"""eval.sweep --quick end to end: its own tiny teacher, kl and topk_bucket (explicit --losses kept by
--quick), one seed; the report's numbers are the runs' own evaluations; a second start skips what is
done; a failing run is reported. Without a launch: the grid's arguments, names and layout, and the
summary and report (paired differences, teachers) from eval.json files written here."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from eval.evaluate import TAIL_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(*args, timeout=600):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eval.sweep", "--config", "launch/configs/demo_distill.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
def test_quick_sweep_reports_the_runs_own_metrics_and_restarts(tmp_path):
    out = tmp_path / "sweep"
    first = _sweep("--quick", "--losses", "kl,topk_bucket", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: run 1/2 kl-t1 seed 0" in first.stderr and "sweep: run 2/2 topk_bucket-k5-t1 seed 0" in first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["settings"]] == ["kl-t1", "topk_bucket-k5-t1"] and summary["failed"] == []
    report = (out / "report.md").read_text()
    for setting in summary["settings"]:
        assert setting["runs"] == [f"{setting['name']}/seed0"]
        evaluation = json.loads((out / setting["runs"][0] / "eval.json").read_text())
        evaluated = evaluation["metrics"]
        # The tail metrics too (bands of the config's prepared data.train), but for bands without positions.
        tail = set(TAIL_METRICS) - set(evaluation["bands"]["empty"])
        assert set(setting["metrics"]) == {"nll", "perplexity", "forward_kl", "top1_agreement", "full_ece",
                                           "top1_ece"} | tail and "nll_frequent" in tail
        for name, stats in setting["metrics"].items():
            assert stats["values"] == [evaluated[name]] and stats["mean"] == evaluated[name]
            assert stats["std"] is None and stats["vs_kl"] is None  # one seed: no spread, no paired test
        assert f"| {setting['name']} | 1 | {setting['metrics']['nll']['mean']:.4g} | – |" in report
    assert (setting_kinds := {(s["kind"], s["top_k"], s["beta"], s["beta_mode"], s["teacher"])
                              for s in summary["settings"]}) == {("kl", None, None, None, None),
                                                                 ("topk_bucket", 5, None, None, None)}, setting_kinds
    assert summary["teacher_comparison"] == []
    run = out / "topk_bucket-k5-t1" / "seed0"
    assert (out / "nll.png").is_file() and (run / "student" / "config.json").is_file()
    trained = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert (trained["kind"], trained["top_k"]) == ("topk_bucket", 5)

    again = _sweep("--quick", "--losses", "kl,topk_bucket", "--out", str(out))
    assert again.returncode == 0 and again.stderr.count("done already, skipped") == 2, again.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == summary

    broken = _sweep("--losses", "kl", "--seeds", "0", "--out", str(tmp_path / "broken"),
                    "--set", f"teacher.path={out}/assets/teacher/student", "--set", f"tokenizer={out}/assets/tokenizer",
                    "--set", "student.config=/nonexistent/student.json", "--set", f"data.train={out}/assets/prepared-train",
                    "--set", f"data.eval={out}/assets/prepared-eval", "--set", "train.max_steps=2",
                    "--set", "train.warmup_steps=1")
    assert broken.returncode == 1
    failed = json.loads((tmp_path / "broken" / "summary.json").read_text())["failed"]
    assert [(f["setting"], f["seed"]) for f in failed] == [("kl-t1", 0)]
    assert "could not load a model config from '/nonexistent/student.json'" in failed[0]["error"]
    assert "FAILED" in broken.stderr
    assert "## Failed runs" in (tmp_path / "broken" / "report.md").read_text()


def test_the_demo_sweep_script_runs_both_settings_with_the_shipped_configs(tmp_path):
    """launch/sweep_demo.sh under DRY_RUN=1: the data, the four trainings and the two sweeps it runs,
    each sweep's arguments accepted by eval.sweep's own parser and its config loading, and the
    reduced grids they give (both teachers in pre-training)."""
    import shlex

    from eval.sweep import build_parser, resolve_grid, settings
    from training.config import load_config

    result = subprocess.run(["bash", "launch/sweep_demo.sh", str(tmp_path / "sweep")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    trained = [c[c.index("--config") + 1] for c in commands if c[:1] == ["deepspeed"]]
    assert trained == ["launch/configs/demo_teacher.yaml", "launch/configs/demo_teacher_large.yaml",
                       "launch/configs/demo_distill.yaml", "launch/configs/demo_sft_teacher.yaml"]
    sweeps = [c[3:] for c in commands if c[:3] == ["python", "-m", "eval.sweep"]]
    assert [s[s.index("--config") + 1] for s in sweeps] == ["launch/configs/demo_distill.yaml",
                                                            "launch/configs/demo_sft_distill.yaml"]
    grids = []
    for arguments in sweeps:
        args = resolve_grid(build_parser().parse_args(arguments))
        assert args.seeds == [0, 1, 2]
        load_config(os.path.join(ROOT, args.config), args.overrides)
        grids.append([s.path for s in settings(args.losses, args.top_k, args.beta, args.temperature, args.beta_mode,
                                               args.teachers)])
    per_teacher = ["ce", "kl-t1", "tail-k10-b1-t1", "tail-k10-b1-t1-seq", "topk_bucket-k10-t1", "miniplm"]
    assert grids[0] == [f"{t}/{name}" for t in ("demo", "large") for name in per_teacher]
    assert grids[1] == ["ce", "kl-t1", "tail-k10-b1-t1", "topk_bucket-k10-t1"]
    assert "--math-data" in sweeps[1] and "--math-data" not in sweeps[0]


def test_quick_fills_only_the_grid_arguments_not_given():
    from eval.sweep import build_parser, resolve_grid

    def resolved(*argv):
        args = resolve_grid(build_parser().parse_args(["--config", "c.yaml", "--out", "o", *argv]))
        return args.losses, args.top_k, args.beta, args.seeds

    assert resolved("--quick") == (["kl", "tail"], [5], [2.0], [0])
    assert resolved("--quick", "--losses", "ce,tail", "--seeds", "3,4") == (["ce", "tail"], [5], [2.0], [3, 4])
    assert resolved("--quick", "--top-k", "7", "--beta", "0.5,1") == (["kl", "tail"], [7], [0.5, 1.0], [0])
    from loss.registry import LOSSES

    assert resolved() == (sorted(LOSSES), [5, 10], [1.0, 2.0], [0, 1, 2])
    assert resolved("--losses", "kl", "--top-k", "3") == (["kl"], [3], [1.0, 2.0], [0, 1, 2])


def test_grid_names_beta_modes_teachers_and_sweep_only_settings(monkeypatch):
    import argparse

    from core.errors import ConfigError
    from eval import sweep
    from eval.sweep import SWEEP_ONLY, SweepOnly, Teacher, build_parser, settings

    assert [s.name for s in settings(["kl", "tail", "topk_bucket", "ce"], [5], [1.0, 2.0], [1.0])] == [
        "kl-t1", "tail-k5-b1-t1", "tail-k5-b2-t1", "topk_bucket-k5-t1", "ce"]  # default: names unchanged
    grid = settings(["tail", "topk_bucket"], [10], [1.0], [1.0], ["constant", "sequence"])
    assert [s.name for s in grid] == ["tail-k10-b1-t1", "tail-k10-b1-t1-seq", "topk_bucket-k10-t1"]
    assert grid[1].overrides(None) == ["loss.kind=tail", "loss.top_k=10", "loss.beta=1.0", "loss.temperature=1.0",
                                       "loss.beta_mode=sequence"]
    assert grid[2].overrides(None) == ["loss.kind=topk_bucket", "loss.top_k=10", "loss.temperature=1.0"]

    teachers = build_parser().parse_args(["--config", "c", "--out", "o", "--teachers", "small=/a,big=/b/c"]).teachers
    assert teachers == [Teacher("small", "/a"), Teacher("big", "/b/c")]
    # A sweep-only setting: a registry kind trained with overrides of its own, per teacher.
    selection = SweepOnly("ce", "ce on a selection", lambda args, teacher: [f"data.train={args.root}/{teacher.name}"])
    monkeypatch.setitem(SWEEP_ONLY, "selected", selection)
    grid = settings(["kl", "selected"], [10], [1.0], [1.0], None, teachers)
    assert [s.path for s in grid] == ["small/kl-t1", "small/selected", "big/kl-t1", "big/selected"]
    assert grid[3].overrides(argparse.Namespace(root="/sel")) == ["loss.kind=ce", "teacher.path=/b/c",
                                                                  "data.train=/sel/big"]
    with pytest.raises(ConfigError, match="--losses: unknown 'nope'; expected some of .*topk_bucket.*selected"):
        settings(["nope"], [1], [1.0], [1.0])
    for argv, key in ((["--beta-mode", "sequence", "--set", "loss.beta_mode=constant"], "loss.beta_mode"),
                      (["--teachers", "a=/a", "--set", "teacher.path=/b"], "teacher.path")):
        args = sweep.resolve_grid(build_parser().parse_args(["--config", "c", "--out", "o", *argv]))
        with pytest.raises(ConfigError, match=f"sweep sets {key} itself"):
            sweep._check_arguments(args)
    with pytest.raises(ConfigError, match="--beta-mode: unknown 'seq'; expected some of constant, sequence"):
        sweep._check_arguments(sweep.resolve_grid(build_parser().parse_args(["--config", "c", "--out", "o",
                                                                             "--beta-mode", "seq"])))
    for bad in ("a=/x,a=/y", "a/b=/x", "noequals"):  # repeated, not a directory name, no path
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--config", "c", "--out", "o", "--teachers", bad])


def test_a_teacher_free_kind_is_trained_under_the_first_teacher_only(tmp_path, monkeypatch):
    """With --teachers, ce (its loss reads no teacher) trains once: the later teachers' ce runs take
    the first's student (the same seed, data and schedule give the same student bit for bit; the
    demo grid's were), are evaluated against their own teacher and launch no training; a missing
    twin is a named failure. Distillation kinds and sweep-only settings train per teacher."""
    from eval import sweep, sweep_runs
    from eval.sweep import Teacher, build_parser, settings, trained_twin

    args = build_parser().parse_args(["--config", "c", "--out", str(tmp_path), "--teachers", "small=/a,big=/b"])
    grid = {s.path: s for s in settings(["ce", "kl", "miniplm"], [10], [1.0], [1.0], None, args.teachers)}
    assert trained_twin(args, grid["big/ce"], 2) == str(tmp_path / "small" / "ce" / "seed2")
    assert trained_twin(args, grid["small/ce"], 2) is None
    assert trained_twin(args, grid["big/kl-t1"], 2) is None and trained_twin(args, grid["big/miniplm"], 2) is None
    assert args.teachers[0] == Teacher("small", "/a")

    launched = []
    monkeypatch.setattr(sweep_runs, "run_logged", lambda command, log, env=None: launched.append(command) or 0)
    run_dir = tmp_path / "big" / "ce" / "seed2"
    assert "student of" in sweep._train(str(run_dir), args, grid["big/ce"], 2, str(tmp_path / "log"), {})
    twin = tmp_path / "small" / "ce" / "seed2" / "student"
    twin.mkdir(parents=True)
    (twin / "config.json").write_text("{}")
    (twin / "model.safetensors").write_bytes(b"weights")
    assert sweep._train(str(run_dir), args, grid["big/ce"], 2, str(tmp_path / "log"), {}) is None
    assert (run_dir / "student" / "model.safetensors").read_bytes() == b"weights" and launched == []


def _write_eval(out, path, seed, **metrics):
    run = out / path / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"metrics": metrics}))


def test_summary_and_report_pair_each_teacher_with_its_own_kl(tmp_path):
    """Two teachers, kl and tail over 3 seeds, from eval.json files written here: each tail − kl is
    paired with its own teacher's kl, and the change between teachers is paired by seed."""
    from scipy.stats import ttest_rel

    from eval.report import write_sweep_report
    from eval.sweep import METRICS, Teacher, settings, summarise

    teachers = [Teacher("small", "/s"), Teacher("big", "/b")]
    grid = settings(["kl", "tail"], [10], [1.0], [1.0], ["sequence"], teachers)
    kl = {"small": [1.0, 1.2, 1.1], "big": [0.9, 1.0, 0.95]}
    tail = {"small": [1.1, 1.25, 1.3], "big": [0.9, 1.05, 0.97]}
    for teacher in ("small", "big"):
        for seed in range(3):
            _write_eval(tmp_path, f"{teacher}/kl-t1", seed, nll=kl[teacher][seed])
            _write_eval(tmp_path, f"{teacher}/tail-k10-b1-t1-seq", seed, nll=tail[teacher][seed])
    summary = summarise(str(tmp_path), grid, [0, 1, 2], {("big/kl-t1", 5): "boom"}, beta_mode="constant")
    entries = {(s["teacher"], s["name"]): s for s in summary["settings"]}
    small_tail = entries[("small", "tail-k10-b1-t1-seq")]
    assert small_tail["runs"] == [f"small/tail-k10-b1-t1-seq/seed{seed}" for seed in range(3)]
    assert small_tail["beta_mode"] == "sequence" and entries[("small", "kl-t1")]["beta_mode"] is None
    differences = {t: [a - b for a, b in zip(tail[t], kl[t])] for t in kl}
    vs = small_tail["metrics"]["nll"]["vs_kl"]
    assert vs["values"] == pytest.approx(differences["small"]) and vs["seeds"] == [0, 1, 2]
    assert vs["p_value"] == pytest.approx(ttest_rel(tail["small"], kl["small"]).pvalue)
    assert entries[("big", "tail-k10-b1-t1-seq")]["metrics"]["nll"]["vs_kl"]["values"] == pytest.approx(
        differences["big"])
    [row] = summary["teacher_comparison"]
    change = [b - s for b, s in zip(differences["big"], differences["small"])]
    assert (row["setting"], row["metric"], row["first"]) == ("tail-k10-b1-t1-seq", "nll", "small")
    assert row["changes"]["big"]["mean"] == pytest.approx(sum(change) / 3)
    assert row["changes"]["big"]["p_value"] == pytest.approx(ttest_rel(differences["big"], differences["small"]).pvalue)
    write_sweep_report(str(tmp_path), summary, METRICS, [0, 1, 2], "python -m eval.sweep ...")
    report = (tmp_path / "report.md").read_text()
    assert "| big/tail-k10-b1-t1-seq | 3 |" in report and "## Does setting − kl change with the teacher?" in report
    assert "its data differ per teacher (the selection is made with each teacher)" in report
    assert f"| tail-k10-b1-t1-seq | nll | {vs['mean']:+.3g} ± " in report and "- big/kl-t1 seed 5: boom" in report
