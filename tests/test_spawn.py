"""model_parallel.spawn.run_on_ranks: results per rank, a rank's error named, a rank dying before its
result reported, a teardown crash after a saved result tolerated with a warning."""

import os
import signal

import pytest

from model_parallel.spawn import run_on_ranks


def _worker(rank, world_size, mode):
    if mode == "fail" and rank == 1:
        raise ValueError("bad input on rank 1")
    if mode == "fail" and rank == 2:
        os._exit(3)  # no result saved
    if mode == "abort_after" and rank == 1:
        # What gloo's threads do once in a few dozen runs: abort after the rank's work is done.
        import atexit

        atexit.register(lambda: os.kill(os.getpid(), signal.SIGABRT))
    return rank * 10 + world_size


def test_failed_ranks_are_named():
    with pytest.raises(AssertionError) as failed:
        run_on_ranks(3, _worker, "fail")
    message = str(failed.value)
    assert "rank 0" not in message
    assert "rank 1:" in message and "ValueError: bad input on rank 1" in message
    assert "rank 2:\nexited with code 3 before saving a result" in message


def test_a_crash_in_teardown_after_the_result_keeps_the_results():
    with pytest.warns(UserWarning, match="rank 1 saved its result, then exited with code"):
        assert run_on_ranks(2, _worker, "abort_after") == [2, 12]


def _stuck_worker(rank, world_size, mode):
    import time

    if mode == "stuck_after_result" and rank == 1:
        import atexit

        atexit.register(lambda: time.sleep(3600))  # a teardown that never returns
    if mode == "peer_failed" and rank == 1:
        raise ValueError("rank 1 fails while rank 0 waits")
    if mode == "peer_failed" and rank == 0:
        time.sleep(3600)  # as if blocked in a collective with the failed rank
    return rank


def test_a_rank_stuck_after_its_result_or_beside_a_failed_peer_is_not_waited_for(monkeypatch):
    import time

    import model_parallel.spawn as spawn

    monkeypatch.setattr(spawn, "_GRACE_S", 2)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="rank 1 saved its result, then exited with code -9"):
        assert run_on_ranks(2, _stuck_worker, "stuck_after_result", timeout=600) == [0, 1]
    with pytest.raises(AssertionError, match="(?s)rank 0:\nexited with code -9 before saving.*rank 1:.*fails while"):
        run_on_ranks(2, _stuck_worker, "peer_failed", timeout=600)
    assert time.monotonic() - start < 120
