"""A JIT build lock left by a killed first launch is reported (never removed) before the next launch waits on it."""

import os
import subprocess
import sys
import time

import pytest

from model_parallel.distributed import stale_build_locks
from model_parallel.spawn import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lock(root, name, age_s):
    build_dir = root / name
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return build_dir, str(lock)


def test_an_old_lock_with_no_build_alive_is_reported_with_the_command_that_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _, old = _lock(tmp_path, "deepspeed_shm_comm", age_s=900)
    _lock(tmp_path, "fresh_op", age_s=10)  # a build that may be starting right now
    warning, waiting = stale_build_locks(max_age_s=300)
    assert warning.startswith(f"warning: {old} is a torch extension build lock 15 min old and no build runs on "
                              f"this node") and warning.endswith(f"remove it: rm {old}")
    assert waiting == (f"waiting for {old} to be removed: torch waits on it before it builds or loads "
                       f"deepspeed_shm_comm")
    assert os.path.exists(old)  # reported, never deleted: a shared cache may be another node's


def test_an_old_lock_with_a_build_running_in_its_directory_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir, _ = _lock(tmp_path, "py311_cpu/deepspeed_shm_comm", age_s=900)
    assert len(stale_build_locks(max_age_s=300)) == 2  # found under the per-Python level too
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=build_dir)  # as ninja runs
    try:
        assert stale_build_locks(max_age_s=300) == []
    finally:
        builder.kill()
        builder.wait()


@pytest.mark.e2e
def test_a_launch_names_the_lock_it_is_about_to_wait_on(tmp_path):
    """launch.distill, started on a cache whose shm-comm build lock was left behind: it prints both lines
    and then waits in torch's build lock, as it would forever; the test stops it there."""
    _, old = _lock(tmp_path, "deepspeed_shm_comm", age_s=900)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": ROOT, "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    launch = subprocess.Popen([sys.executable, "-m", "launch.distill", "--config", "launch/configs/demo_distill.yaml"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any(line.startswith("waiting for") for line in lines) and time.monotonic() < deadline:
            line = launch.stderr.readline()
            if not line:
                break
            lines.append(line)
        assert any(line.startswith(f"warning: {old} is a torch extension build lock") for line in lines), lines
        assert any(line.startswith(f"waiting for {old} to be removed") for line in lines), lines
        time.sleep(2)
        assert launch.poll() is None  # still waiting on the lock
    finally:
        launch.kill()
        launch.wait()
