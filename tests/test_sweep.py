"""eval.sweep --quick end to end: its own tiny teacher, kl and topk_bucket (explicit --losses kept by
--quick), one seed; the report's numbers are the runs' own evaluations; a second start skips what is
done; a failing run is reported. Without a launch: the grid's arguments, names and layout, and the
summary and report (paired differences, teachers, the on-policy fraction λ) from eval.json files written here."""

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
    """launch/sweep_demo.sh under DRY_RUN=1: the data, the four trainings and the three sweeps it runs,
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
                                                            "launch/configs/demo_sft_distill.yaml",
                                                            "launch/configs/demo_sft_distill.yaml"]
    grids = []
    for arguments in sweeps:
        args = resolve_grid(build_parser().parse_args(arguments))
        assert args.seeds == [0, 1, 2]
        load_config(os.path.join(ROOT, args.config), args.overrides)
        grids.append([s.path for s in settings(args.losses, args.top_k, args.beta, args.temperature, args.beta_mode,
                                               args.teachers, args.on_policy)])
    per_teacher = ["ce", "kl-t1", "tail-k10-b1-t1", "tail-k10-b1-t1-seq", "topk_bucket-k10-t1", "miniplm"]
    assert grids[0] == [f"{t}/{name}" for t in ("demo", "large") for name in per_teacher]
    assert grids[1] == ["ce", "kl-t1", "tail-k10-b1-t1", "topk_bucket-k10-t1"]
    assert grids[2] == [f"{name}-op{fraction}" for name in ("kl-t1", "tail-k10-b1-t1") for fraction in ("0", "0.5", "1")]
    assert "--math-data" in sweeps[1] and "--math-data" in sweeps[2] and "--math-data" not in sweeps[0]


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


def test_on_policy_is_a_grid_dimension_named_op_and_set_only_where_positive(tmp_path, monkeypatch):
    """--on-policy λ,...: every setting × λ (λ innermost), named ...-op<λ>; ce and miniplm (no teacher
    scores their tokens) at λ 0 only; a run gets on_policy.fraction only where λ > 0, so a λ 0 run's
    command is the one without the flag; the λ 0.5 run's config, as the job loads it, has λ 0.5."""
    from eval import sweep, sweep_runs
    from eval.sweep import build_parser, resolve_grid, settings, trained_twin
    from training.config import load_config

    plain = settings(["ce", "kl", "tail", "miniplm"], [10], [1.0], [1.0])
    assert [s.name for s in plain] == ["ce", "kl-t1", "tail-k10-b1-t1", "miniplm"]  # no flag: names unchanged
    grid = settings(["ce", "kl", "tail", "miniplm"], [10], [1.0], [1.0], None, None, [0.0, 0.5, 1.0])
    assert [s.name for s in grid] == ["ce-op0", "kl-t1-op0", "kl-t1-op0.5", "kl-t1-op1", "tail-k10-b1-t1-op0",
                                      "tail-k10-b1-t1-op0.5", "tail-k10-b1-t1-op1", "miniplm-op0"]
    by_name = {s.name: s for s in grid}
    assert by_name["kl-t1-op0"].overrides(None) == plain[1].overrides(None) == ["loss.kind=kl", "loss.temperature=1.0"]
    assert by_name["ce-op0"].overrides(None) == ["loss.kind=ce"]
    assert by_name["tail-k10-b1-t1-op0.5"].overrides(None) == ["loss.kind=tail", "loss.top_k=10", "loss.beta=1.0",
                                                               "loss.temperature=1.0", "on_policy.fraction=0.5"]
    # β modes and teachers keep their places; λ comes last in the name; ce's twin is at λ 0 too.
    args = build_parser().parse_args(["--config", "launch/configs/demo_distill.yaml", "--out", str(tmp_path),
                                      "--teachers", "small=/a,big=/b", "--on-policy", "0.5,0"])
    grid = settings(["ce", "tail"], [10], [1.0], [1.0], ["sequence"], args.teachers, args.on_policy)
    assert [s.path for s in grid] == [f"{t}/{n}" for t in ("small", "big") for n in (
        "ce-op0", "tail-k10-b1-t1-seq-op0.5", "tail-k10-b1-t1-seq-op0")]
    assert trained_twin(args, grid[3], 1) == str(tmp_path / "small" / "ce-op0" / "seed1")
    assert trained_twin(args, grid[4], 1) is None

    launched = []
    monkeypatch.setattr(sweep_runs, "run_logged", lambda command, log, env=None: launched.append(command) or 1)
    args.overrides, args.launcher_args = [], "--num_gpus 1"
    for setting in grid[1:3]:
        run_dir = tmp_path / setting.path / "seed1"
        run_dir.mkdir(parents=True)
        assert "training failed" in sweep._train(str(run_dir), args, setting, 1, str(tmp_path / "log"), {})
    sets = [[c[i + 1] for i in range(len(c) - 1) if c[i] == "--set"] for c in launched]
    assert [[item for item in s if item.startswith("on_policy.")] for s in sets] == [["on_policy.fraction=0.5"], []]
    assert sets[0][:-2] == sets[1][:-2] + ["on_policy.fraction=0.5"]  # then output_dir and seed
    job = load_config(os.path.join(ROOT, args.config), [item for item in sets[0] if not item.startswith("output_dir")])
    assert (job.on_policy.fraction, job.loss.kind, job.loss.beta_mode, job.teacher.path) == (0.5, "tail", "sequence",
                                                                                              "/a")
    assert load_config(os.path.join(ROOT, args.config), sets[1][:-2]).on_policy.fraction == 0.0

    # --quick fills no λ, and keeps the ones given.
    quick = resolve_grid(build_parser().parse_args(["--config", "c", "--out", "o", "--quick"]))
    assert quick.on_policy is None
    assert resolve_grid(build_parser().parse_args(["--config", "c", "--out", "o", "--quick", "--on-policy",
                                                   "0,1"])).on_policy == [0.0, 1.0]


def test_off_policy_only_kinds_follow_the_job_configs_refusal():
    """The sweep's λ 0 only rule (off_policy_only) is the job config's: for every registry kind, a
    config with on_policy.fraction 1 is refused by name exactly for the off_policy_only ones; the
    sweep says which settings it holds at λ 0, and only where some λ > 0 was asked for."""
    from core.errors import ConfigError
    from eval.sweep import SWEEP_ONLY, off_policy_note, off_policy_only
    from loss.registry import LOSSES
    from training.config import load_config

    config = os.path.join(ROOT, "launch/configs/demo_distill.yaml")
    refused = set()
    for kind in LOSSES:
        try:
            load_config(config, [f"loss.kind={kind}", "on_policy.fraction=1"])
        except ConfigError as error:
            assert f"on_policy.fraction: loss.kind {kind!r}" in str(error)
            refused.add(kind)
    assert refused == {kind for kind in LOSSES if off_policy_only(kind)} == {"ce"}
    assert off_policy_only("miniplm") and SWEEP_ONLY["miniplm"].kind == "ce"
    note = off_policy_note(["ce", "kl", "miniplm"], [0.0, 0.5, 1.0])
    assert note.startswith("sweep: on-policy (on_policy.fraction > 0) is refused by the job for ce, miniplm (")
    assert note.endswith("run at λ 0 only (named ...-op0), not at 0.5, 1")
    assert off_policy_note(["ce", "kl"], [0.0]) is None and off_policy_note(["kl", "tail"], [0.5]) is None
    assert off_policy_note(["ce"], None) is None


def test_on_policy_refusals_name_the_bad_value(tmp_path):
    from core.errors import ConfigError
    from eval import sweep
    from eval.sweep import build_parser, settings
    from training.config import load_config

    def check(*argv):
        sweep._check_arguments(sweep.resolve_grid(build_parser().parse_args(["--config", "c", "--out", "o", *argv])))

    for value, message in (("0,1.5", "got 1.5"), ("-0.1", "got -0.1"), ("nan", "got nan")):
        bounds = r"--on-policy: λ \(on_policy.fraction\) must be in \[0, 1\], "
        with pytest.raises(ConfigError, match=bounds + message):
            check("--on-policy", value)
    with pytest.raises(ConfigError, match="--on-policy: λ 0.5 given twice"):
        check("--on-policy", "0,0.5,0.50")
    with pytest.raises(ConfigError, match="--on-policy: no λ given"):
        check("--on-policy", ",")
    with pytest.raises(ConfigError, match="sweep sets on_policy.fraction itself"):
        check("--on-policy", "0,1", "--set", "on_policy.fraction=0.5")
    check("--set", "on_policy.fraction=0.5")  # without the flag, the config's λ is the user's
    check("--on-policy", "0,0.5,1", "--set", "on_policy.temperature=0.7")

    # Before any run: the job's on-policy refusals (ce_weight > 0), and a config whose own λ the λ 0 runs would take.
    config = os.path.join(ROOT, "launch/configs/demo_distill.yaml")
    args = build_parser().parse_args(["--config", config, "--out", "o", "--on-policy", "0,0.5",
                                      "--set", "loss.ce_weight=0.1"])
    grid = settings(["ce", "kl"], [10], [1.0], [1.0], None, None, args.on_policy)
    with pytest.raises(ConfigError, match=r"--on-policy: kl-t1-op0.5's runs would be refused: loss.ce_weight"):
        sweep._check_on_policy_configs(args, load_config(config, args.overrides), grid)
    args.overrides = []
    sweep._check_on_policy_configs(args, load_config(config), grid)
    # Continuations that do not fit the prepared data's rows (32 + 64 > 64), and packed SFT rows.
    for manifest, message in (({"format": "text", "seq_len": 64, "packed": False},
                               "on_policy.prompt_tokens \\+ on_policy.max_new_tokens: must be <= .* 64"),
                              ({"format": "sft", "seq_len": 256, "packed": True}, "packed SFT rows")):
        data = tmp_path / f"data-{manifest['format']}"
        data.mkdir()
        (data / "manifest.json").write_text(json.dumps(manifest))
        args.overrides = [f"data.train={data}"]
        with pytest.raises(ConfigError, match=r"--on-policy: kl-t1-op0.5's runs would be refused: .*" + message):
            sweep._check_on_policy_configs(args, load_config(config, args.overrides), grid)
    args.overrides = []
    own = tmp_path / "own.yaml"
    own.write_text(open(config).read() + "on_policy:\n  fraction: 0.25\n")
    args.config = str(own)
    with pytest.raises(ConfigError, match="own.yaml sets on_policy.fraction 0.25, which its λ 0 runs"):
        sweep._check_on_policy_configs(args, load_config(str(own)), grid)


def test_summary_and_report_show_each_setting_at_each_on_policy_fraction(tmp_path):
    """kl and tail at λ 0, 0.5, 1 and ce at λ 0 over 3 seeds, from eval.json files written here: each
    entry's on_policy and group, vs kl against kl at the same λ, vs λ 0 against the same setting at
    λ 0 (paired by seed); the report's λ column and its table by λ, mean ± std over seeds."""
    import statistics

    from scipy.stats import ttest_rel

    from eval.report import write_sweep_report
    from eval.sweep import METRICS, settings, summarise

    grid = settings(["ce", "kl", "tail"], [10], [1.0], [1.0], None, None, [0.0, 0.5, 1.0])
    nll = {"ce-op0": [2.0, 2.25, 2.1], "kl-t1-op0": [1.0, 1.2, 1.1], "kl-t1-op0.5": [0.9, 1.15, 1.0],
           "kl-t1-op1": [0.95, 1.1, 0.9], "tail-k10-b1-t1-op0": [1.1, 1.25, 1.3],
           "tail-k10-b1-t1-op0.5": [1.0, 1.2, 1.05], "tail-k10-b1-t1-op1": [0.8, 1.0, 1.1]}
    for name, values in nll.items():
        for seed, value in enumerate(values):
            _write_eval(tmp_path, name, seed, nll=value)
    summary = summarise(str(tmp_path), grid, [0, 1, 2], {})
    entries = {s["name"]: s for s in summary["settings"]}
    assert [(s["name"], s["group"], s["on_policy"]) for s in summary["settings"]] == [
        ("ce-op0", "ce", 0.0), ("kl-t1-op0", "kl-t1", 0.0), ("kl-t1-op0.5", "kl-t1", 0.5), ("kl-t1-op1", "kl-t1", 1.0),
        ("tail-k10-b1-t1-op0", "tail-k10-b1-t1", 0.0), ("tail-k10-b1-t1-op0.5", "tail-k10-b1-t1", 0.5),
        ("tail-k10-b1-t1-op1", "tail-k10-b1-t1", 1.0)]
    tail = entries["tail-k10-b1-t1-op0.5"]["metrics"]["nll"]
    assert tail["mean"] == pytest.approx(statistics.mean(nll["tail-k10-b1-t1-op0.5"]))
    assert tail["std"] == pytest.approx(statistics.stdev(nll["tail-k10-b1-t1-op0.5"]))
    assert tail["vs_kl"]["values"] == pytest.approx([a - b for a, b in zip(nll["tail-k10-b1-t1-op0.5"],
                                                                           nll["kl-t1-op0.5"])])
    assert tail["vs_off_policy"]["values"] == pytest.approx([a - b for a, b in zip(nll["tail-k10-b1-t1-op0.5"],
                                                                                   nll["tail-k10-b1-t1-op0"])])
    kl = entries["kl-t1-op1"]["metrics"]["nll"]
    assert kl["vs_kl"] is None  # kl at λ 1 is its λ's reference
    assert kl["vs_off_policy"]["p_value"] == pytest.approx(ttest_rel(nll["kl-t1-op1"], nll["kl-t1-op0"]).pvalue)
    assert entries["ce-op0"]["metrics"]["nll"]["vs_kl"]["values"] == pytest.approx(
        [a - b for a, b in zip(nll["ce-op0"], nll["kl-t1-op0"])])
    assert all(entries[n]["metrics"]["nll"]["vs_off_policy"] is None for n in ("ce-op0", "kl-t1-op0"))

    write_sweep_report(str(tmp_path), summary, METRICS, [0, 1, 2], "python -m eval.sweep ... --on-policy 0,0.5,1")
    report = (tmp_path / "report.md").read_text()
    assert "| setting | λ | runs | mean ± std | vs kl | vs λ 0 |" in report

    def cell(values):
        return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"

    differences = [a - b for a, b in zip(nll["tail-k10-b1-t1-op0.5"], nll["kl-t1-op0.5"])]
    assert (f"| tail-k10-b1-t1-op0.5 | 0.5 | 3 | {cell(nll['tail-k10-b1-t1-op0.5'])} | "
            f"{statistics.mean(differences):+.3g} ± {statistics.stdev(differences):.2g} (p ") in report
    assert "| setting | λ 0 | λ 0.5 | λ 1 |" in report
    assert ("| kl-t1 | " + " | ".join(cell(nll[f"kl-t1-op{v}"]) for v in ("0", "0.5", "1")) + " |") in report
    assert f"| ce | {cell(nll['ce-op0'])} | – | – |" in report

    # Without the flag: the config's λ in every entry, and the report as before (no λ column, no table by λ).
    plain = settings(["kl"], [10], [1.0], [1.0])
    _write_eval(tmp_path, "kl-t1", 0, nll=1.0)
    assert [s["on_policy"] for s in summarise(str(tmp_path), plain, [0], {})["settings"]] == [0.0]
    assert [s["on_policy"] for s in summarise(str(tmp_path), plain, [0], {}, on_policy=0.25)["settings"]] == [0.25]
    write_sweep_report(str(tmp_path), summarise(str(tmp_path), plain, [0], {}), METRICS, [0], "python -m eval.sweep")
    report = (tmp_path / "report.md").read_text()
    assert "| kl-t1 | 1 | 1 | – |" in report and "λ" not in report
