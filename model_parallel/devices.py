"""Which device and process-group backend a rank uses, decided before anything touches CUDA.

A rank is either an NCCL rank, bound to GPU ``LOCAL_RANK`` (``torch.cuda.set_device`` before the
first collective), or a gloo rank on DeepSpeed's CPU accelerator that never touches CUDA, also on
a machine that has GPUs: fewer GPUs than local ranks is allowed for gloo (the test launcher,
``launch.export`` of a 16-rank checkpoint on one 8-GPU node) and refused by name for NCCL (the
training job), on every rank before the rendezvous, so no rank waits for one that died.

DeepSpeed fixes its accelerator once, the first time ``get_accelerator()`` runs (``import
deepspeed`` does): from ``DS_ACCELERATOR``, else CUDA when ``torch.cuda`` sees a device
(``deepspeed/accelerator/real_accelerator.py``). A gloo rank therefore sets ``DS_ACCELERATOR=cpu``
before DeepSpeed is imported; see :func:`use_accelerator`.
"""

import os
import sys
from typing import NamedTuple, Optional

import torch

from core.errors import UserError

BACKENDS = ("nccl", "gloo")


class RankDevice(NamedTuple):
    """What one rank runs on."""

    backend: str
    """The ``torch.distributed`` backend: ``nccl`` or ``gloo``."""
    accelerator: str
    """DeepSpeed's accelerator for this process: ``cuda`` (NCCL ranks) or ``cpu`` (gloo ranks)."""
    cuda_device: Optional[int]
    """The ordinal for ``torch.cuda.set_device``; None: this rank never touches CUDA."""


def visible_gpus() -> int:
    """How many GPUs this process sees (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_world_size() -> Optional[int]:
    """The number of ranks on this node as the launcher says (torchrun ``LOCAL_WORLD_SIZE``,
    the deepspeed launcher ``LOCAL_SIZE``), or None where it does not say."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def accelerator_kind() -> str:
    """``cuda`` or ``cpu``: DeepSpeed's accelerator in this process, already chosen or as it will
    choose it (``DS_ACCELERATOR``, else CUDA where a device is visible). Never imports DeepSpeed."""
    chosen = _chosen_accelerator()
    if chosen is not None:
        return chosen
    override = os.environ.get("DS_ACCELERATOR")
    if override:
        return override
    return "cuda" if visible_gpus() > 0 else "cpu"


def _chosen_accelerator() -> Optional[str]:
    """The name of DeepSpeed's accelerator if this process has fixed it already, else None."""
    module = sys.modules.get("deepspeed.accelerator.real_accelerator")
    accelerator = getattr(module, "ds_accelerator", None)
    return None if accelerator is None else accelerator._name


def decide_rank_device(local_rank: int, backend: Optional[str] = None, *,
                       ranks_on_node: Optional[int] = None) -> RankDevice:
    """The backend and device of the rank with ``local_rank`` of ``ranks_on_node`` on this node.

    ``backend`` None: NCCL where a GPU is visible and ``DS_ACCELERATOR`` does not say ``cpu``,
    else gloo. gloo ranks run on the CPU accelerator, however many GPUs there are. An NCCL rank
    needs its own GPU: where ``local_rank`` (or the highest local rank, when the launcher gives
    ``ranks_on_node``, so that every rank refuses, not just the ones past the count) has no
    visible GPU, :class:`UserError` says so in one line. Queries CUDA's device count only.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpus = visible_gpus()
    if backend is None:
        backend = "nccl" if gpus > 0 and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" else "gloo"
    if backend == "gloo":
        return RankDevice("gloo", "cpu", None)
    highest = max(local_rank, (ranks_on_node or 0) - 1)
    if highest >= gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        what = f"{ranks_on_node} ranks run on this node but" if ranks_on_node else "has no GPU:"
        raise UserError(f"LOCAL_RANK {local_rank}: {what} {gpus} GPU(s) are visible{where}; NCCL needs one GPU per "
                        f"rank: start at most {gpus} rank(s) per node (deepspeed --num_gpus {gpus}, torchrun "
                        f"--nproc_per_node {gpus}) and add nodes for more")
    return RankDevice("nccl", "cuda", local_rank)


def use_accelerator(name: str) -> None:
    """Make DeepSpeed's accelerator ``name`` in this process: ``DS_ACCELERATOR`` before DeepSpeed
    chooses one. Where it already chose another (DeepSpeed imported too early), ``RuntimeError``:
    switching afterwards would leave DeepSpeed's import-time state on the wrong device."""
    chosen = _chosen_accelerator()
    if chosen is not None and chosen != name:
        raise RuntimeError(f"DeepSpeed already uses its {chosen} accelerator but this rank needs {name}: import "
                           f"deepspeed only after model_parallel.distributed.init_distributed, or set "
                           f"DS_ACCELERATOR={name}")
    os.environ["DS_ACCELERATOR"] = name


def bind(device: RankDevice) -> None:
    """Apply ``device`` to this process before DeepSpeed starts: the accelerator, and for NCCL the
    GPU (NCCL binds each rank's communicator to the current device at the first collective)."""
    use_accelerator(device.accelerator)
    if device.cuda_device is not None:
        torch.cuda.set_device(device.cuda_device)


def local_group_backend(world_size: int, *, deepspeed: bool) -> str:
    """The backend of ``world_size`` ranks started on this machine by a local launcher: NCCL only
    for DeepSpeed groups with a GPU for every rank, else gloo (on the CPU accelerator)."""
    return "nccl" if deepspeed and visible_gpus() >= world_size else "gloo"
