"""Rank 0 writes something long to a shared file system while the other ranks wait on the files.

Waiting inside a collective (``broadcast_object_list`` until rank 0 is done) bounds the work by
the collective timeout: NCCL's watchdog ends any collective older than ``parallel.timeout_s``
(1800 s by default) and the job with it, however healthy rank 0 is. Preparing a large corpus or
converting a large checkpoint can take longer. :func:`produced_on_rank_0` runs one short barrier,
then lets the other ranks poll the file system instead, so the work itself has no time limit:

- the result is *done* when a file that is written last (atomically) exists, e.g. a manifest in a
  directory renamed into place, or a completion marker;
- rank 0 writes ``<marker>.failed`` (its error message, one line) if the work fails, and every
  rank raises the same error;
- rank 0 rewrites ``<marker>.working`` with a counter while it works; a counter that has not moved
  for ``limit_s`` means rank 0 is gone (killed, out of memory) and ends the wait with an error.
"""

import os
import sys
import threading
import time
from typing import Callable, Type

import torch.distributed as dist

from core.errors import UserError
from core.files import write_atomically

FAILED_SUFFIX = ".failed"
WORKING_SUFFIX = ".working"
POLL_S = 0.5
"""How often a waiting rank looks (a few ``stat`` calls)."""
PROGRESS_S = 60.0
"""How often a waiting rank says it still waits (one line per node)."""


class _Heartbeat:
    """A daemon thread that rewrites ``path`` with an increasing counter every ``interval`` seconds."""

    def __init__(self, path: str, interval: float):
        self.path, self.interval, self.beats = path, interval, 0
        self.stopped = threading.Event()
        self.beat()  # the file exists before any rank is told to look for it
        self.thread = threading.Thread(target=self._run, name="rank0-heartbeat", daemon=True)
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


def _wait(what: str, done: Callable[[], bool], marker: str, limit_s: float, error: Type[Exception]) -> None:
    failed, working = marker + FAILED_SUFFIX, marker + WORKING_SUFFIX
    talk = os.environ.get("LOCAL_RANK", "0") == "0"  # one line per node
    started = last_change = last_said = time.monotonic()
    last_beat = _read(working)
    if talk:
        print(f"rank {dist.get_rank()}: waiting for rank 0: {what}", file=sys.stderr, flush=True)
    while True:
        if done():
            return
        message = _read(failed)
        if message is not None:
            raise error(message.strip())
        beat, now = _read(working), time.monotonic()
        if beat is None:
            # Rank 0 finishes in this order: the result (or its error), then the heartbeat goes.
            if done():
                return
            message = _read(failed)
            if message is not None:
                raise error(message.strip())
            raise error(f"{what}: rank 0 stopped without a result or an error ({working} is gone)")
        if beat != last_beat:
            last_beat, last_change = beat, now
        elif now - last_change > limit_s:
            raise error(f"{what}: rank 0's heartbeat {working} has not moved for {limit_s:.0f} s (rank 0 gone?); "
                        f"parallel.timeout_s={limit_s:.0f} bounds this wait")
        if talk and now - last_said >= PROGRESS_S:
            last_said = now
            print(f"rank {dist.get_rank()}: still waiting for rank 0 ({now - started:.0f} s): {what}",
                  file=sys.stderr, flush=True)
        time.sleep(POLL_S)


def produced_on_rank_0(what: str, produce: Callable[[], None], *, done: Callable[[], bool], marker: str,
                       limit_s: float, error: Type[Exception] = UserError) -> None:
    """Collective (one barrier): rank 0 runs ``produce()`` unless ``done()`` already holds; every other
    rank returns once ``done()`` holds on the shared file system, however long that takes.

    ``done`` must turn true atomically (a file written last, or renamed into place). A
    :class:`core.errors.UserError` on rank 0 is raised on every rank with its message (on the others
    as ``error``); any other exception is raised on rank 0 as it is and on the others as ``error``
    naming it. A rank 0 silent for ``limit_s`` (its heartbeat still) fails the others. ``marker`` is
    the path stem of the two files rank 0 writes beside the result (``.working``, ``.failed``).
    """
    rank = dist.get_rank()
    heartbeat = None
    if rank == 0:
        try:
            os.remove(marker + FAILED_SUFFIX)  # left by an earlier failed run
        except FileNotFoundError:
            pass
        if not done():
            os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
            heartbeat = _Heartbeat(marker + WORKING_SUFFIX, interval=min(10.0, limit_s / 4))
    dist.barrier()  # rank 0 spent only a few file operations before it: far below any collective timeout
    if rank != 0:
        _wait(what, done, marker, limit_s, error)
        return
    if heartbeat is None:
        return
    try:
        produce()
    except UserError as failure:
        write_atomically(marker + FAILED_SUFFIX, f"{failure}\n")
        raise
    except BaseException as failure:  # noqa: BLE001 -- told to the waiting ranks, then raised here as it is
        write_atomically(marker + FAILED_SUFFIX, f"{what} failed on rank 0: {failure!r}\n")
        raise
    finally:
        heartbeat.stop()
