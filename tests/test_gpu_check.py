"""benchmarks/gpu_check.sh cannot run here (no GPU); its parts that do not need one are checked:
its syntax, that every ``-k`` filter in it selects tests, that a CPU build of torch stops it with
what to install, the host-sync counter of benchmarks/sync_count.py (fed the warnings torch's sync
debug mode raises), and the table of benchmarks/gpu_summary.py against figures worked out here."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings

import pytest
import yaml

from benchmarks.gpu_summary import main as summary_main
from benchmarks.gpu_summary import run_row
from benchmarks.sync_count import SYNC_WARNING, SyncCounter
from tests.tiny_models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks/gpu_check.sh")


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _pytest_filters():
    """``(test files, -k expression)`` of each command line in gpu_check.sh that runs tests with -k."""
    filters = []
    for line in open(SCRIPT):
        if " -k " in line and "tests/" in line and not line.lstrip().startswith("#"):  # pytest or tests/run.sh
            words = shlex.split(line)
            filters.append(([w for w in words if w.startswith("tests/") and w.endswith(".py")],
                            words[words.index("-k") + 1]))
    return filters


# Collects (never runs) the tests a -k expression selects, in one process for all expressions.
_COLLECT = """
import json, sys
import pytest

class Count:
    def pytest_collection_finish(self, session):
        self.items = [item.nodeid for item in session.items]

counts = []
for files, expression in json.loads(sys.argv[1]):
    count = Count()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *files, "-k", expression], plugins=[count])
    counts.append(count.items)
print("SELECTED " + json.dumps(counts))
"""


@pytest.mark.e2e
def test_every_k_filter_in_the_script_selects_a_test():
    """Each ``-k`` expression, and each of its ``or`` terms alone (one that matches nothing, such as
    the old ``resume_reproduces``, hides in an ``or``), selects at least one test of its files."""
    filters = _pytest_filters()
    assert filters, "gpu_check.sh runs no pytest -k filter (has the command line changed?)"
    queries = []
    for files, expression in filters:
        assert files, expression
        queries.append((files, expression))
        if " or " in expression and not re.search(r"\b(and|not)\b|[()]", expression):
            queries += [(files, term.strip()) for term in expression.split(" or ")]
    result = subprocess.run([sys.executable, "-c", _COLLECT, json.dumps(queries)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    selected = json.loads(result.stdout.split("SELECTED ", 1)[1])
    empty = [f"-k {expression!r} in {files}" for (files, expression), items in zip(queries, selected) if not items]
    assert not empty, "selects no test: " + "; ".join(empty)


def _commands(script: str) -> list:
    """The script's command lines, continuation lines joined."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", open(script).read()).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_job_in_the_script_names_its_dtype():
    """``train.dtype`` is never left to ``auto`` (bf16 on a GPU, fp32 on a CPU): each job the script
    starts sets it, and the tests it runs name it in their configs."""
    jobs = [command for command in _commands(SCRIPT) if "--config launch/configs/" in command]
    assert len(jobs) == 3  # the demo's teacher and distillation, the 9B/1B pair
    assert all("--set train.dtype=bf16" in job for job in jobs), [job for job in jobs if "train.dtype" not in job]


@pytest.mark.e2e
def test_a_cpu_build_of_torch_stops_the_check_with_what_to_install(tmp_path):
    """--system-python uses python3 on PATH as it is (here the CPU build of this venv): the check prints
    the versions, says what to install and exits 2, before any section; it sources no venv (PYTHON
    set to ``false`` would make launch/env.sh fail, exit 1)."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "VENV": str(tmp_path / "no-venv"), "PYTHON": "false"}
    result = subprocess.run(["bash", SCRIPT, "--system-python"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    import deepspeed
    import torch
    import transformers

    assert f"torch:        {torch.__version__} (built for CUDA None; pinned 2.13.0)" in result.stdout
    assert f"deepspeed:    {deepspeed.__version__}" in result.stdout
    assert f"transformers: {transformers.__version__}" in result.stdout
    assert "nvcc:" in result.stdout and "gpus/driver:" in result.stdout
    assert "is a CPU build (torch.version.cuda is None)" in result.stderr
    assert "install the CUDA wheel of torch 2.13.0 from PyTorch's index" in result.stderr
    assert "== 1." not in result.stdout and "Installing" not in result.stdout


def test_nvcc_is_reported_against_torchs_cuda():
    from benchmarks.gpu_env import nvcc_note

    release = "nvcc: NVIDIA (R) Cuda compiler driver; Cuda compilation tools, release {}, V{}"
    assert nvcc_note(release.format("12.4", "12.4.131"), "12.8") == "not needed: no op is built at start-up"
    assert nvcc_note(release.format("13.0", "13.0.88"), "12.8") == (
        "CUDA 13.0, torch's is 12.8: not needed, but a config that asks for a JIT-built DeepSpeed op would be refused")
    assert nvcc_note("not found on PATH", "12.8").startswith("none: not needed")


def test_an_unknown_argument_is_refused(tmp_path):
    # Were it ignored, the venv step would fail at once (PYTHON=false) rather than install anything.
    env = {**os.environ, "VENV": str(tmp_path / "no-venv"), "PYTHON": "false"}
    result = subprocess.run(["bash", SCRIPT, "--sytem-python"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_check.sh [--system-python]" in result.stderr


def test_the_sync_counter_counts_each_steps_sync_warnings(recwarn):
    """Fed what torch's sync debug mode raises (a UserWarning per synchronising call), the counter
    keeps one count per step, turns the mode on only during the step, passes other warnings on and
    restores the mode when the step raises."""
    modes = []
    counter = SyncCounter(set_mode=modes.append)

    def step(syncs, fail=False):
        assert modes[-1] == "warn"  # on while the step runs
        for _ in range(syncs):
            warnings.warn(SYNC_WARNING)  # what torch raises (TORCH_WARN in c10/cuda), the same line each time
        warnings.warn("an unrelated warning")
        if fail:
            raise RuntimeError("step failed")
        return syncs

    counted = counter.wrap(step)
    assert [counted(3), counted(0), counted(5)] == [3, 0, 5]
    with pytest.raises(RuntimeError):
        counted(2, fail=True)
    assert counter.steps == [3, 0, 5, 2]
    assert modes == ["warn", "default"] * 4
    site = f"tests/test_gpu_check.py:{step.__code__.co_firstlineno + 3}"
    assert counter.as_dict(world_size=2) == {"mode": "warn", "world_size": 2, "steps": [3, 0, 5, 2],
                                             "sites": {site: 10}}
    assert [str(w.message) for w in recwarn] == ["an unrelated warning"] * 4
    assert SyncCounter().as_dict(1)["mode"] == "off (no CUDA)"


def _llama_matmul_weights(config):
    """Weights that multiply, by hand for tests.tiny_models.llama (untied: the head, not the
    embedding): per layer q, k, v, o (H x H each, heads = KV heads), gate, up, down (H x 2H each) and
    two norms; the final norm; the V x H head."""
    hidden, vocab = config.hidden_size, config.vocab_size
    return config.num_hidden_layers * (4 * hidden ** 2 + 3 * 2 * hidden ** 2 + 2 * hidden) + hidden + vocab * hidden


@pytest.fixture
def fake_run(tmp_path):
    """A run directory as the job and sync_count.py leave it, with figures chosen here."""
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data/manifest.json").write_text(json.dumps({"seq_len": 64}))
    student, teacher = llama(512, hidden=32, layers=1), llama(520, hidden=48, layers=2)
    student.to_json_file(str(tmp_path / "student.json"))
    (tmp_path / "teacher").mkdir()
    teacher.to_json_file(str(tmp_path / "teacher/config.json"))
    (run / "config.yaml").write_text(yaml.safe_dump({
        "teacher": {"path": str(tmp_path / "teacher")}, "student": {"config": str(tmp_path / "student.json")},
        "data": {"train": str(tmp_path / "data"), "seq_len": 512}}))
    records = [{"step": 1, "loss": 9.0, "tokens_per_s": 100.0, "peak_memory_gb": 0.5, "planned_peak_memory_gb": 0.5},
               {"step": 2, "loss": 8.0, "tokens_per_s": 1000.0, "peak_memory_gb": 0.7, "planned_peak_memory_gb": 0.5},
               {"step": 3, "loss": 7.0, "tokens_per_s": 2000.0, "peak_memory_gb": 0.6, "planned_peak_memory_gb": 0.5,
                "eval/loss": 7.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "host_syncs_rank0.json").write_text(json.dumps(
        {"mode": "warn", "world_size": 2, "steps": [40, 4, 7], "sites": {"loss/tail.py:10": 9, "x.py:2": 2}}))
    return run, student, teacher


def test_the_summary_row_from_a_run_directory(fake_run):
    run, student, teacher = fake_run
    row = run_row("fake", str(run), peak_tflops=2.0)
    assert (row["steps"], row["ranks"], row["measured_gb"], row["planned_gb"]) == (3, 2, 0.7, 0.5)
    assert row["tokens_per_s"] == 1500.0  # step 1 left out
    assert (row["syncs_median"], row["syncs_max"]) == (5.5, 7)  # steps 2 and 3
    seq = 64  # the prepared data's, not data.seq_len
    student_flops = 6 * _llama_matmul_weights(student) + 12 * 1 * 2 * 16 * seq  # 2 heads of 16
    teacher_flops = 2 * _llama_matmul_weights(teacher) + 4 * 2 * 2 * 24 * seq  # 2 layers, 2 heads of 24
    assert row["mfu"] == pytest.approx((student_flops + teacher_flops) * 1500.0 / (2 * 2.0e12), rel=1e-12)


def test_the_summary_table(fake_run, tmp_path, capsys):
    run, _, _ = fake_run
    summary_main(["--peak-tflops", "2", f"fake run={run}", f"gone={tmp_path / 'never-ran'}"])
    lines = capsys.readouterr().out.strip().splitlines()
    row = next(line for line in lines if line.startswith("| fake run |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:8] == ["fake run", "2", "3", "0.50", "0.70", "1.40", "1,500", "5.5 (7)"]
    assert re.fullmatch(r"\d+\.\d%", cells[8])
    assert "| gone | - | - | - | - | - | - | - | - |" in lines
    assert any(line.startswith("gone: no ") for line in lines)
    assert "fake run: most host syncs at loss/tail.py:10 (9), x.py:2 (2)" in lines
    assert any("2 TFLOP/s dense bf16 peak: an estimate" in line for line in lines)
    assert lines[-1].startswith("| gone |")  # the table ends the output


@pytest.mark.e2e
def test_sync_count_runs_the_job_one_step_counted_each(tmp_path, tokenizer_dir, tokenizer, demo_dir):
    """benchmarks/sync_count.py without a launcher: one rank runs launch.distill with the arguments
    it was given, and one count per optimizer step is written (0 here: no CUDA, nothing counted);
    the summary reads the job's own metrics."""
    from data.prepare import prepare
    from tests.tiny_models import save_model

    prepare(str(tokenizer_dir), [str(demo_dir / "pretrain/eval.txt")], str(tmp_path / "data"), fmt="text",
            seq_len=32)
    llama(512, layers=1).to_json_file(str(tmp_path / "student.json"))
    out = tmp_path / "run"
    config = {"output_dir": str(out), "seed": 5, "tokenizer": str(tokenizer_dir),
              "teacher": {"path": save_model(llama(512, hidden=48), tmp_path / "teacher", tokenizer)},
              "student": {"config": str(tmp_path / "student.json")}, "data": {"train": str(tmp_path / "data")},
              "loss": {"kind": "tail", "top_k": 5, "beta": 2.0},
              "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1, "warmup_steps": 1, "dtype": "fp32"},
              "parallel": {"tensor_parallel": 1, "deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json")},
              "checkpoint": {"every": 1000}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "benchmarks/sync_count.py", "--syncs-out", str(out), "--config",
                             str(tmp_path / "run.yaml"), "--set", "logging.every=2"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    syncs = json.load(open(out / "host_syncs_rank0.json"))
    assert syncs == {"mode": "off (no CUDA)", "world_size": 1, "steps": [0, 0, 0], "sites": {}}
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 3]  # logging.every=2 reached the job, and the last step
    row = run_row("cpu", str(out), peak_tflops=None)
    assert row["measured_gb"] == max(r["peak_memory_gb"] for r in records) and row["steps"] == 2
    assert row["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in records) / 2)
    assert "syncs_median" not in row and "mfu" not in row and math.isfinite(row["planned_gb"])
