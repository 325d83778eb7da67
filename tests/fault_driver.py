"""The test side of training.faults' handshake: let a job run up to an exact point on one rank."""

import os
import threading
import time

from core.files import write_atomically
from training.faults import event_file, reply_file


class FaultDriver:
    """Replies to every fault point of a job started with ``DISTILL_FAULTS_DIR=directory`` except
    ``event`` on ``rank``, which is held there (:meth:`wait_held` returns once it is). Other ranks
    keep getting replies, so they run on into the collectives the held rank never joins."""

    def __init__(self, directory, ranks: int, *, rank: int, event: str):
        self.directory, self.ranks, self.target = str(directory), ranks, (rank, event)
        self.held = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        replied = {}
        while not self._stop.is_set():
            for rank in range(self.ranks):
                try:
                    with open(event_file(self.directory, rank)) as handle:
                        event = handle.read()
                except FileNotFoundError:
                    continue
                if (rank, event) == self.target:
                    self.held.set()
                elif replied.get(rank) != event:
                    replied[rank] = event
                    write_atomically(reply_file(self.directory, rank), "go")
            time.sleep(0.01)

    def wait_held(self, timeout: float = 240) -> None:
        assert self.held.wait(timeout), f"no rank reached {self.target} within {timeout} s"

    def stop(self):
        self._stop.set()
        self._thread.join()


def faults_dir(tmp_path):
    path = os.path.join(str(tmp_path), "faults")
    os.makedirs(path, exist_ok=True)
    return path
