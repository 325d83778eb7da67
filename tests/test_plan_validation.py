"""training.plan against what the job measures on CPU (benchmarks/plan_check.py, four of its rows):
the job's logged peak memory within ±25% of its logged plan, collective bytes per step within ±10%."""

import os

import pytest

from benchmarks.plan_check import LAYOUTS, ROWS, compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.e2e
def test_planned_memory_and_traffic_match_the_measured(tmp_path, monkeypatch):
    """The job itself (training.job.run, 2 steps), run as users run it: a Llama pair (146 M / 65 M)
    and a Gemma-2 pair (134 M / 59 M; eager soft-capped attention, fp32 norms, tied at TP 1 and
    untied at TP 2), each at TP 1 and 2; DP 1 and 2, student ZeRO stages 0, 1 and 3, a resident
    and a ZeRO-3 teacher, checkpointing on and off. Memory: the job's logged peak_memory_gb (RSS
    growth; the job fixes glibc's mmap threshold in-process, nothing is set in the environment)
    against its logged planned_peak_memory_gb; the planner leaves out the libraries the build
    loads (~0.1-0.4 GB here), hence the tolerance. Bytes: everything handed to torch.distributed
    collectives in step 2, DeepSpeed's gathers and reduce-scatters included."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    rows = [("llama", *LAYOUTS[6]), ("llama", *LAYOUTS[3]), ("gemma2", *LAYOUTS[2]), ("gemma2", *LAYOUTS[4])]
    assert all(row in ROWS for row in rows)
    for pair in ("llama", "gemma2"):
        assert {row[2] for row in rows if row[0] == pair} == {1, 2}  # TP 1 and 2 for each pair
    assert {row[1] // row[2] for row in rows} == {1, 2} and {row[3] for row in rows} == {"resident", "zero3"}
    assert {row[4] for row in rows} == {0, 1, 3} and {row[5] for row in rows} == {True, False}
    for row, plan, measured in compare(str(tmp_path), rows):
        memory_ratio = measured["planned_peak_memory_gb"] / measured["peak_memory_gb"]
        bytes_ratio = sum(plan.traffic.values()) / measured["collective_bytes"]
        assert measured["planned_peak_memory_gb"] == pytest.approx(plan.peak_memory_bytes / 1e9, rel=1e-6), row
        assert 0.75 <= memory_ratio <= 1.25, (row, memory_ratio, plan.memory, measured)
        assert 0.9 <= bytes_ratio <= 1.1, (row, bytes_ratio, plan.traffic, measured)
