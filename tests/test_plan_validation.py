"""training.plan against what the job measures on CPU (benchmarks/plan_check.py, four of its layouts):
peak memory growth within ±25% and collective bytes per step within ±10%."""

import os

import pytest

from benchmarks.plan_check import LAYOUTS, compare, write_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.e2e
def test_planned_memory_and_traffic_match_the_measured(tmp_path, monkeypatch):
    """TP 1 and 2, DP 1 and 2, student ZeRO stages 0, 1 and 3, a resident and a ZeRO-3 teacher,
    checkpointing on and off. Memory:
    the job's peak_memory_gb (RSS growth) against the planned peak; the planner leaves out the
    libraries the build loads (~0.1-0.4 GB here), hence the tolerance. Bytes: everything handed to
    torch.distributed collectives, DeepSpeed's gathers and reduce-scatters included."""
    monkeypatch.chdir(ROOT)
    layouts = [LAYOUTS[i] for i in (6, 2, 3, 4)]
    assert {layout[1] for layout in layouts} == {1, 2} and {layout[0] // layout[1] for layout in layouts} == {1, 2}
    assert {layout[2] for layout in layouts} == {"resident", "zero3"} and {layout[4] for layout in layouts} == {
        True, False}
    assert {layout[3] for layout in layouts} == {0, 1, 3}
    write_pair(str(tmp_path))
    for layout, plan, measured in compare(str(tmp_path), layouts):
        memory_ratio = plan.peak_memory_bytes / 1e9 / measured["peak_memory_gb"]
        bytes_ratio = sum(plan.traffic.values()) / measured["collective_bytes"]
        assert 0.75 <= memory_ratio <= 1.25, (layout, memory_ratio, plan.memory, measured)
        assert 0.9 <= bytes_ratio <= 1.1, (layout, bytes_ratio, plan.traffic, measured)
