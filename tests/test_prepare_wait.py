"""Raw data prepared by rank 0 cannot trip the collective timeout (training.data.ensure_prepared).

Two gloo ranks whose process group times out after COLLECTIVE_TIMEOUT_S; rank 0's preparation is
made slower than that (a sleep before the real ``data.prepare``). The waiting rank must still get
the prepared directory, the group must still work afterwards, and a failure on rank 0 (after the
same delay) must reach rank 1 as the same one-line error. Waiting inside a collective (the old
``broadcast_object_list``) fails both: rank 1's collective times out.
"""

import os
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest

from model_parallel.spawn import free_port, run_on_ranks

COLLECTIVE_TIMEOUT_S = 2
PREPARE_DELAY_S = 2.5 * COLLECTIVE_TIMEOUT_S


def _cfg(output_dir, tokenizer_dir):
    return SimpleNamespace(output_dir=output_dir, tokenizer=tokenizer_dir, teacher=SimpleNamespace(path=None),
                           student=SimpleNamespace(path=None), data=SimpleNamespace(format="text", seq_len=32),
                           # The heartbeat's bound, not the collective's: generous, so a loaded machine passes.
                           parallel=SimpleNamespace(timeout_s=120))


def _rank(rank, world_size, port, output_dir, tokenizer_dir, good, bad):
    import torch.distributed as dist

    import training.data

    # A group whose collectives give up after COLLECTIVE_TIMEOUT_S, as NCCL's watchdog does after
    # parallel.timeout_s.
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    if rank == 0:
        real = training.data.prepare

        def slow(*args, **kwargs):
            time.sleep(PREPARE_DELAY_S)
            return real(*args, **kwargs)

        training.data.prepare = slow
    cfg = _cfg(output_dir, tokenizer_dir)
    dist.barrier()  # start together: the skew below is the preparation's alone
    out = {}
    started = time.monotonic()
    try:
        training.data.ensure_prepared(cfg, bad, "eval")
    except Exception as error:  # noqa: BLE001 -- compared across ranks by the test
        out["error"] = (type(error).__name__, str(error))
    started = time.monotonic()
    out["prepared"] = training.data.ensure_prepared(cfg, good, "train")
    out["waited_s"] = time.monotonic() - started
    dist.barrier()  # the group still works: nobody's collective timed out
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tokenizer_dir, demo_dir):
    root = tmp_path_factory.mktemp("prepare_wait")
    bad = root / "bad.txt"
    bad.write_text("")  # data.prepare refuses an empty file, naming it
    results = run_on_ranks(2, _rank, free_port(), str(root / "run"), str(tokenizer_dir),
                           str(demo_dir / "pretrain/eval.txt"), str(bad), timeout=180)
    return root, results


@pytest.mark.e2e
def test_a_slow_preparation_on_rank_0_does_not_time_out_the_others(ranks, tokenizer_dir, demo_dir, tmp_path):
    from data.loader import load_prepared
    from data.prepare import prepare

    root, results = ranks
    out = str(root / "run" / "data" / "train")
    assert [r["prepared"] for r in results] == [out, out]
    assert results[1]["waited_s"] > COLLECTIVE_TIMEOUT_S  # rank 1 waited longer than any collective may
    # What rank 1 got is what data.prepare makes of the same input, prepared here independently.
    counts = prepare(str(tokenizer_dir), [str(demo_dir / "pretrain/eval.txt")], str(tmp_path / "ref"), fmt="text",
                     seq_len=32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    blocks, manifest = load_prepared(out, tokenizer)
    reference, _ = load_prepared(str(tmp_path / "ref"), tokenizer)
    assert manifest["counts"] == counts
    assert blocks["input_ids"] == reference["input_ids"]
    assert sorted(os.listdir(root / "run" / "data")) == ["eval.failed", "train"]  # no heartbeat (.working) left


@pytest.mark.e2e
def test_rank_0s_failure_reaches_every_rank_as_the_same_error(ranks):
    root, results = ranks
    expected = ("DataError", f"data.eval: input file is empty: {root / 'bad.txt'}")
    assert [r["error"] for r in results] == [expected, expected]


def test_a_silent_rank_0_ends_the_wait_naming_the_timeout(tmp_path, monkeypatch):
    """Rank 0 killed mid-work: its heartbeat file stays, unchanged; the waiting rank gives up after
    ``limit_s`` (parallel.timeout_s) with one line instead of waiting forever."""
    from core.errors import DataError
    from model_parallel.file_wait import WORKING_SUFFIX, _wait

    monkeypatch.setenv("LOCAL_RANK", "1")  # not the node's first rank: no progress lines (no group here)
    marker = str(tmp_path / "train")
    (tmp_path / f"train{WORKING_SUFFIX}").write_text("7\n")  # what a killed rank 0 left
    started = time.monotonic()
    with pytest.raises(DataError) as error:
        _wait("data.train: preparing x into y", lambda: False, marker, 1.0, DataError)
    assert 1.0 <= time.monotonic() - started < 10
    assert str(error.value) == (f"data.train: preparing x into y: rank 0's heartbeat {marker}{WORKING_SUFFIX} has not "
                                f"moved for 1 s (rank 0 gone?); parallel.timeout_s=1 bounds this wait")
