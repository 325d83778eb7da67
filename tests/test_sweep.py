"""eval.sweep --quick end to end: its own tiny teacher, kl and tail, one seed; the report's numbers
are the runs' own evaluations; a second start skips what is done; a failing run is reported."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(*args, timeout=600):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eval.sweep", "--config", "launch/configs/demo_distill.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
def test_quick_sweep_reports_the_runs_own_metrics_and_restarts(tmp_path):
    out = tmp_path / "sweep"
    first = _sweep("--quick", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: run 1/2 kl-t1 seed 0" in first.stderr and "sweep: run 2/2 tail-k5-b2-t1 seed 0" in first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["settings"]] == ["kl-t1", "tail-k5-b2-t1"] and summary["failed"] == []
    report = (out / "report.md").read_text()
    for setting in summary["settings"]:
        assert setting["runs"] == [f"{setting['name']}/seed0"]
        evaluated = json.loads((out / setting["runs"][0] / "eval.json").read_text())["metrics"]
        assert set(setting["metrics"]) == {"nll", "perplexity", "forward_kl", "top1_agreement", "full_ece", "top1_ece"}
        for name, stats in setting["metrics"].items():
            assert stats["values"] == [evaluated[name]] and stats["mean"] == evaluated[name]
            assert stats["std"] is None and stats["vs_kl"] is None  # one seed: no spread, no paired test
        assert f"| {setting['name']} | 1 | {setting['metrics']['nll']['mean']:.4g} | – |" in report
    assert (setting_kinds := {(s["kind"], s["top_k"], s["beta"]) for s in summary["settings"]}) == {
        ("kl", None, None), ("tail", 5, 2.0)}, setting_kinds
    assert (out / "nll.png").is_file() and (out / "tail-k5-b2-t1" / "seed0" / "student" / "config.json").is_file()

    again = _sweep("--quick", "--out", str(out))
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
    """launch/sweep_demo.sh under DRY_RUN=1: the data, the three trainings and the two sweeps it runs,
    each sweep's arguments accepted by eval.sweep's own parser and its config loading."""
    import shlex

    from eval.sweep import build_parser
    from training.config import load_config

    result = subprocess.run(["bash", "launch/sweep_demo.sh", str(tmp_path / "sweep")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    trained = [c[c.index("--config") + 1] for c in commands if c[:1] == ["deepspeed"]]
    assert trained == ["launch/configs/demo_teacher.yaml", "launch/configs/demo_distill.yaml",
                       "launch/configs/demo_sft_teacher.yaml"]
    sweeps = [c[3:] for c in commands if c[:3] == ["python", "-m", "eval.sweep"]]
    assert [s[s.index("--config") + 1] for s in sweeps] == ["launch/configs/demo_distill.yaml",
                                                            "launch/configs/demo_sft_distill.yaml"]
    for arguments in sweeps:
        args = build_parser().parse_args(arguments)
        assert args.losses == ["ce", "kl", "reverse_kl", "tail"] and args.seeds == [0, 1, 2]
        load_config(os.path.join(ROOT, args.config), args.overrides)
    assert "--math-data" in sweeps[1] and "--math-data" not in sweeps[0]
