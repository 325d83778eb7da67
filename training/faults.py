"""Fault injection for the reliability tests; nothing here does anything unless a test sets its variable.

- ``DISTILL_FAULTS_DIR=DIR``: at each fault point (after every training step, ``step <N>``; after a
  rank has written its checkpoint shards, ``saving step_<N>``) the rank writes the event to
  ``DIR/rank<R>`` and waits for ``DIR/rank<R>.reply``, which it removes before going on. A test
  thereby stops a rank at an exact point (and kills it there) without sleeping or polling logs.
- ``DISTILL_FAULTS_NAN_TEACHER=RANK:STEP``: that rank's teacher logits are NaN at that step (a hook
  on the teacher's output layer, installed once at start-up, makes its input NaN; the step's code is
  untouched, fused head or not).
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


def _poison_teacher_head(engines, rank: int, step: int):
    """A forward pre-hook on the teacher's output layer: its input (the final hidden states) is NaN on
    ``rank`` at optimizer step ``step``, so its logits are NaN on either path (the fused head makes
    them inside the loss from those rows; the unfused head makes them whole)."""
    student = engines.student

    def hook(module, args):
        if dist.get_rank() == rank and student.global_steps + 1 == step:
            return (args[0].detach().clone().fill_(float("nan")),) + tuple(args[1:])
        return None

    head = getattr(engines.teacher, "module", engines.teacher).get_output_embeddings()
    return head.register_forward_pre_hook(hook)


def install(engines) -> None:
    """Poison the teacher as ``DISTILL_FAULTS_NAN_TEACHER`` asks (nothing when it is unset)."""
    if _NAN_TEACHER and engines.teacher is not None:
        rank, step = (int(part) for part in _NAN_TEACHER.split(":"))
        _poison_teacher_head(engines, rank, step)
