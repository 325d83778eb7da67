"""Fault injection for the reliability tests; nothing here does anything unless a test sets its variable.

- ``DISTILL_FAULTS_DIR=DIR``: at each fault point (after every training step, ``step <N>``; after a
  rank has written its checkpoint shards, ``saving step_<N>``) the rank writes the event to
  ``DIR/rank<R>`` and waits for ``DIR/rank<R>.reply``, which it removes before going on. A test
  thereby stops a rank at an exact point (and kills it there) without sleeping or polling logs.
- ``DISTILL_FAULTS_NAN_TEACHER=RANK:STEP``: that rank's teacher logits are NaN at that step (the
  teacher engine is wrapped once at start-up; the step's code is untouched).
"""

import os
import time

import torch.distributed as dist

from core.files import write_atomically

_DIR = os.environ.get("DISTILL_FAULTS_DIR")
_NAN_TEACHER = os.environ.get("DISTILL_FAULTS_NAN_TEACHER")


def event_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}")


def reply_file(directory: str, rank: int) -> str:
    return event_file(directory, rank) + ".reply"


def point(event: str) -> None:
    """A fault point: with ``DISTILL_FAULTS_DIR`` set, announce ``event`` and wait for the reply."""
    if _DIR is None:
        return
    rank = dist.get_rank()
    write_atomically(event_file(_DIR, rank), event)
    reply = reply_file(_DIR, rank)
    while not os.path.exists(reply):
        time.sleep(0.01)
    os.remove(reply)


class _PoisonedTeacher:
    """The teacher engine, whose logits are NaN on ``rank`` at optimizer step ``step``."""

    def __init__(self, engine, student, rank: int, step: int):
        self.engine, self.student, self.rank, self.step = engine, student, rank, step

    def __call__(self, *args, **kwargs):
        out = self.engine(*args, **kwargs)
        if dist.get_rank() == self.rank and self.student.global_steps + 1 == self.step:
            out.logits.fill_(float("nan"))
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def install(engines) -> None:
    """Wrap ``engines.teacher`` as ``DISTILL_FAULTS_NAN_TEACHER`` asks (nothing when it is unset)."""
    if _NAN_TEACHER and engines.teacher is not None:
        rank, step = (int(part) for part in _NAN_TEACHER.split(":"))
        engines.teacher = _PoisonedTeacher(engines.teacher, engines.student, rank, step)
