"""Training data for the job: prepared directories as they are, raw files prepared on the fly.

Raw files are prepared by rank 0 alone (tokenizing a large corpus can take hours), and the other
ranks must not wait for it inside a collective: NCCL's watchdog ends any collective that runs
longer than ``parallel.timeout_s`` (1800 s by default), and the job with it. So the other ranks
wait on the file system instead (:func:`_wait_for_rank_0`): ``data.prepare`` renames the
finished directory, manifest included, into place in one step, so the manifest appearing means the
data is complete. Rank 0 keeps a heartbeat file beside it while it works and, if it fails, writes
its error message there for every rank to raise. The wait has no bound while the heartbeat
moves; a heartbeat still for ``parallel.timeout_s`` (rank 0 killed) ends it with an error.
"""

import os
import sys
import threading
import time

import torch.distributed as dist

from core.errors import DataError
from core.files import write_atomically
from data.manifest import MANIFEST
from data.prepare import prepare

FAILED_SUFFIX = ".failed"
"""``<out>.failed``: rank 0's error message, one line, when its preparation of ``<out>`` failed."""
HEARTBEAT_SUFFIX = ".preparing"
"""``<out>.preparing``: a counter rank 0 advances while it prepares ``<out>``."""
POLL_S = 0.5
"""How often a waiting rank looks for the manifest (a few ``stat`` calls)."""
PROGRESS_S = 60.0
"""How often a waiting rank says it is still waiting."""


def _is_prepared(directory: str) -> bool:
    return os.path.isdir(directory) and os.path.isfile(os.path.join(directory, MANIFEST))


class _Heartbeat:
    """A daemon thread that rewrites ``path`` with an increasing counter every ``interval`` seconds."""

    def __init__(self, path: str, interval: float):
        self.path, self.interval, self.beats = path, interval, 0
        self.stopped = threading.Event()
        self.beat()  # the file exists before anyone is told to look for it
        self.thread = threading.Thread(target=self._run, name="prepare-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.beats += 1
        write_atomically(self.path, f"{self.beats}\n")

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _read(path: str):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _wait_for_rank_0(out: str, key: str, source: str, limit_s: float) -> None:
    """Return once ``out`` holds prepared data; raise rank 0's :class:`DataError` if it failed, or a
    :class:`DataError` naming ``parallel.timeout_s`` if its heartbeat stood still for ``limit_s``."""
    failed, heartbeat = out + FAILED_SUFFIX, out + HEARTBEAT_SUFFIX
    talk = os.environ.get("LOCAL_RANK", "0") == "0"  # one message per node
    started = last_change = last_said = time.monotonic()
    last_beat = _read(heartbeat)
    if talk:
        print(f"rank {dist.get_rank()}: waiting for rank 0 to prepare {key} ({source} -> {out})",
              file=sys.stderr, flush=True)
    while True:
        if _is_prepared(out):
            return
        message = _read(failed)
        if message is not None:
            raise DataError(message.strip())
        beat, now = _read(heartbeat), time.monotonic()
        if beat is None:
            # Rank 0 finishes in this order: the data (or the error), then the heartbeat is removed.
            if _is_prepared(out):
                return
            message = _read(failed)
            if message is not None:
                raise DataError(message.strip())
            raise DataError(f"{key}: rank 0 stopped preparing {out} without writing it or an error "
                            f"({heartbeat} is gone)")
        if beat != last_beat:
            last_beat, last_change = beat, now
        elif now - last_change > limit_s:
            raise DataError(f"{key}: rank 0's heartbeat {heartbeat} has not moved for {limit_s:.0f} s while it "
                            f"prepares {out} (rank 0 gone?); parallel.timeout_s={limit_s:.0f} bounds this wait")
        if talk and now - last_said >= PROGRESS_S:
            last_said = now
            print(f"rank {dist.get_rank()}: still waiting for rank 0 to prepare {key} ({now - started:.0f} s)",
                  file=sys.stderr, flush=True)
        time.sleep(POLL_S)


def ensure_prepared(cfg, path: str, split: str) -> str:
    """A ``data.prepare`` directory for ``path``: itself if prepared, else prepared once by rank 0
    into ``output_dir/data/<split>`` (with ``data.format``, ``data.seq_len`` and the run's tokenizer).

    Collective only in one barrier before the work starts (rank 0 has cleared a stale error marker
    and started its heartbeat by then); the other ranks then wait on the file system, however long
    the preparation takes, and raise the same :class:`DataError` if it fails on rank 0.
    """
    if _is_prepared(path):
        return path
    out = os.path.join(cfg.output_dir, "data", split)
    key, limit_s = f"data.{split}", float(cfg.parallel.timeout_s)
    rank = dist.get_rank()
    heartbeat = None
    if rank == 0:
        try:
            os.remove(out + FAILED_SUFFIX)  # left by an earlier failed run
        except FileNotFoundError:
            pass
        if not _is_prepared(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            heartbeat = _Heartbeat(out + HEARTBEAT_SUFFIX, interval=min(10.0, limit_s / 4))
    dist.barrier()  # rank 0 spent only a few file operations here: far below any collective timeout
    if rank != 0:
        _wait_for_rank_0(out, key, path, limit_s)
        return out
    if heartbeat is None:
        return out
    try:
        prepare(cfg.tokenizer or cfg.teacher.path or cfg.student.path, [path], out, fmt=cfg.data.format,
                seq_len=cfg.data.seq_len)
    except DataError as failure:
        message = f"{key}: {failure}"
        write_atomically(out + FAILED_SUFFIX, message + "\n")
        raise DataError(message) from None
    except BaseException as error:  # noqa: BLE001 -- told to the waiting ranks, then raised here as it is
        write_atomically(out + FAILED_SUFFIX, f"{key}: preparing {path} failed on rank 0: {error!r}\n")
        raise
    finally:
        heartbeat.stop()
    return out
