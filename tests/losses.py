"""The losses called by name or bound to their hyper-parameters, as tests use them (the job goes
through :func:`loss.objective.distillation_objective` and :data:`loss.registry.LOSSES` instead)."""

import torch

from core.tokens import IGNORE_INDEX
from loss import LOSSES, cross_entropy, tail_divergence

LOSS_KINDS = tuple(LOSSES)


def per_token_loss(kind: str,
                   student_logits,
                   teacher_logits=None,
                   labels=None,
                   *,
                   top_k: int = 0,
                   beta=1.0,
                   temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX,
                   tp_group=None):
    """The per-token loss named ``kind`` (one of :data:`LOSS_KINDS`), float32, no reduction: the
    registry entry's divergence (``tail`` through the public op, which validates ``beta``), or the
    cross-entropy for a kind without one. ``top_k`` and ``beta`` apply to ``tail`` only."""
    if kind not in LOSSES:
        raise ValueError(f"per_token_loss: unknown kind {kind!r}; expected one of {', '.join(LOSSES)}")
    entry = LOSSES[kind]
    if entry.compute is None:
        if labels is None:
            raise ValueError(f"per_token_loss: kind {kind!r} needs labels")
        return cross_entropy(student_logits, labels, ignore_index=ignore_index, tp_group=tp_group)
    if teacher_logits is None:
        raise ValueError(f"per_token_loss: kind {kind!r} needs teacher_logits")
    if kind == "tail":
        return tail_divergence(student_logits, teacher_logits, top_k=top_k, beta=beta, temperature=temperature,
                               tp_group=tp_group)
    return entry.compute(student_logits, teacher_logits, top_k=top_k, beta_for=lambda mass: beta,
                         temperature=temperature, tp_group=tp_group, shard=None, donate_teacher=False)["kd"]


class TailDivergence(torch.nn.Module):
    """:func:`loss.tail_divergence` with its hyper-parameters bound; ``forward(student, teacher)``."""

    def __init__(self, *, top_k: int, beta: float, temperature: float = 1.0, tp_group=None):
        super().__init__()
        self.top_k, self.beta, self.temperature, self.tp_group = top_k, beta, temperature, tp_group

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return tail_divergence(student_logits, teacher_logits, top_k=self.top_k, beta=self.beta,
                               temperature=self.temperature, tp_group=self.tp_group)
