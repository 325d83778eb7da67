"""Distillation losses on (optionally vocabulary-sharded) logits; each returns per-token values.

``tail`` is the tail-aware divergence (ours); ``kl``, ``reverse_kl`` and ``ce`` are DeepSpeed's
vocabulary-parallel ops behind the same call shape. :data:`LOSSES` (``loss/registry.py``) lists them
by name; :func:`per_token_loss` picks one.
"""

from core.tokens import IGNORE_INDEX
from loss.baselines import cross_entropy, forward_kl, reverse_kl
from loss.registry import LOSSES, Divergence
from loss.tail import TailDivergence, TailParts, TopOne, tail_divergence, tail_divergence_parts

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
    """The per-token loss named ``kind`` (one of :data:`LOSS_KINDS`), float32, no reduction.

    ``tail``, ``kl`` and ``reverse_kl`` need ``teacher_logits``; ``ce`` needs ``labels``;
    ``top_k`` and ``beta`` apply to ``tail`` only.
    """
    if kind not in LOSSES:
        raise ValueError(f"per_token_loss: unknown kind {kind!r}; expected one of {', '.join(LOSSES)}")
    entry = LOSSES[kind]
    if entry.compute is None:
        if labels is None:
            raise ValueError(f"per_token_loss: kind {kind!r} needs labels")
        return cross_entropy(student_logits, labels, ignore_index=ignore_index, tp_group=tp_group)
    if teacher_logits is None:
        raise ValueError(f"per_token_loss: kind {kind!r} needs teacher_logits")
    if kind == "tail":  # the public op validates beta (a number or per-token tensor) itself
        return tail_divergence(student_logits, teacher_logits, top_k=top_k, beta=beta, temperature=temperature,
                               tp_group=tp_group)
    return entry.compute(student_logits, teacher_logits, top_k=top_k, beta_for=lambda mass: beta,
                         temperature=temperature, tp_group=tp_group, shard=None, donate_teacher=False)["kd"]


__all__ = [
    "Divergence",
    "LOSSES",
    "LOSS_KINDS",
    "TailDivergence",
    "TailParts",
    "TopOne",
    "cross_entropy",
    "forward_kl",
    "per_token_loss",
    "reverse_kl",
    "tail_divergence",
    "tail_divergence_parts",
]
