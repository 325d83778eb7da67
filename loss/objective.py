"""The job's per-token objective: ``(1 − ce_weight)·τ²·D + ce_weight·CE``, D from :mod:`loss.registry`."""

from typing import Dict, Optional, Tuple

import torch

from loss.baselines import cross_entropy
from loss.registry import LOSSES, divergence
from model_parallel import VocabShard

OUTPUTS: Tuple[str, ...] = ("loss", "kd", "ce") + tuple(
    dict.fromkeys(name for entry in LOSSES.values() for name in entry.outputs))
"""The per-token float32 tensors :func:`distillation_objective` may return, for logging (each call
returns some of them: ``kd`` and the divergence's :attr:`~loss.registry.Divergence.outputs` with a
teacher, ``ce`` where the loss includes it)."""


def sequence_beta(beta: float, teacher_tail_mass: torch.Tensor, sequence_ids: torch.Tensor,
                  num_sequences: Optional[int] = None) -> torch.Tensor:
    """β_t = β · P_tail,t / mean of P_tail over the tokens of t's sequence (0 where that mean is 0).

    ``teacher_tail_mass`` and ``sequence_ids`` are ``[n]`` over the valid tokens of a batch;
    ``num_sequences`` (the batch's row count, > every id) spares reading the largest id back.
    """
    mass = teacher_tail_mass.detach().float()
    if num_sequences is None:
        num_sequences = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0  # host sync
    count = torch.zeros(num_sequences, device=mass.device)
    total = torch.zeros_like(count)
    count.index_add_(0, sequence_ids, torch.ones_like(mass))
    total.index_add_(0, sequence_ids, mass)
    mean = (total / count.clamp(min=1))[sequence_ids]
    return torch.where(mean > 0, beta * mass / mean.clamp(min=torch.finfo(mass.dtype).tiny), torch.zeros_like(mass))


def distillation_objective(student_logits: torch.Tensor,
                           teacher_logits: Optional[torch.Tensor],
                           labels: torch.Tensor,
                           *,
                           kind: str,
                           top_k: int,
                           beta: float,
                           beta_mode: str = "constant",
                           temperature: float = 1.0,
                           ce_weight: float = 0.0,
                           sequence_ids: Optional[torch.Tensor] = None,
                           num_sequences: Optional[int] = None,
                           tp_group=None,
                           shard: Optional[VocabShard] = None,
                           donate_teacher: bool = False) -> Dict[str, torch.Tensor]:
    """Per-token loss over ``n`` valid tokens (logits ``[n, V_local]``, ``labels`` ``[n]`` ids).

    Returns ``{"loss": [n], "kd": [n], "ce": [n], ...}``: ``loss`` is what to back-propagate (after
    the caller's reduction); the other entries are for logging (:data:`OUTPUTS`), as the divergence
    named ``kind`` (:data:`loss.registry.LOSSES`) returns them (its ``outputs``, and the argmaxes
    where its pass gives them). ``beta_mode`` ``sequence`` needs ``sequence_ids`` (``[n]``, the row
    of each token) and takes ``num_sequences`` (the batch's row count) where the caller knows it.
    ``donate_teacher``: the caller will not read ``teacher_logits`` after backward, so the divergence
    may reuse its storage for the student's gradient (:func:`loss.tail_divergence`). ``shard``: this
    rank's vocabulary slice, resolved once by the caller (the job: when its engines are built); the
    losses then skip their per-call collective layout check and its host sync. None: each loss
    checks the layout itself.
    """
    out = {}
    if divergence(kind).compute is None or ce_weight > 0:
        out["ce"] = cross_entropy(student_logits, labels, tp_group=tp_group, shard=shard)
    if beta_mode == "sequence":
        beta_for = lambda mass: sequence_beta(beta, mass, sequence_ids, num_sequences)  # noqa: E731
    else:
        beta_for = lambda mass: beta  # noqa: E731
    out.update(divergence_outputs(student_logits, teacher_logits, kind=kind, top_k=top_k, beta_for=beta_for,
                                  temperature=temperature, tp_group=tp_group, shard=shard,
                                  donate_teacher=donate_teacher))
    return assemble(out, temperature=temperature, ce_weight=ce_weight)


def divergence_outputs(student_logits, teacher_logits, *, kind: str, top_k: int, beta_for, temperature: float,
                       tp_group=None, shard: Optional[VocabShard] = None,
                       donate_teacher: bool = False) -> Dict[str, torch.Tensor]:
    """The divergence part of the objective: ``kind``'s outputs (``"kd"`` and the rest), or ``{}``
    for a kind without one. ``beta_for(teacher_tail_mass)`` gives the tail weight (a number or per
    token); the other arguments as for :func:`distillation_objective`."""
    entry = divergence(kind)
    if entry.compute is None:
        return {}
    return entry.compute(student_logits, teacher_logits, top_k=top_k, beta_for=beta_for, temperature=temperature,
                         tp_group=tp_group, shard=shard, donate_teacher=donate_teacher)


def assemble(out: Dict[str, torch.Tensor], *, temperature: float, ce_weight: float) -> Dict[str, torch.Tensor]:
    """Add ``out["loss"]``, the per-token objective ``(1 − ce_weight)·τ²·kd + ce_weight·ce`` (``ce``
    alone without a divergence), to ``out`` (which holds ``kd`` and/or ``ce``) and return it: the one
    place the objective is assembled, for the unfused and the fused path alike."""
    if "kd" not in out:
        out["loss"] = out["ce"]
        return out
    scaled = temperature**2 * out["kd"]
    out["loss"] = scaled if ce_weight == 0 else (1 - ce_weight) * scaled + ce_weight * out["ce"]
    return out
