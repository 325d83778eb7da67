"""Distillation losses on (optionally vocabulary-sharded) logits; each returns per-token values.

``tail`` is the tail-aware divergence (ours); ``kl``, ``reverse_kl`` and ``ce`` are DeepSpeed's
vocabulary-parallel ops behind the same call shape. :func:`per_token_loss` picks one by name.
"""

from loss.baselines import cross_entropy, forward_kl, reverse_kl
from loss.tail import TailDivergence, TailParts, tail_divergence, tail_divergence_parts

LOSS_KINDS = ("tail", "kl", "reverse_kl", "ce")


def per_token_loss(kind: str,
                   student_logits,
                   teacher_logits=None,
                   labels=None,
                   *,
                   top_k: int = 0,
                   beta=1.0,
                   temperature: float = 1.0,
                   ignore_index: int = -100,
                   tp_group=None):
    """The per-token loss named ``kind`` (one of :data:`LOSS_KINDS`), float32, no reduction.

    ``tail``, ``kl`` and ``reverse_kl`` need ``teacher_logits``; ``ce`` needs ``labels``;
    ``top_k`` and ``beta`` apply to ``tail`` only.
    """
    if kind == "ce":
        if labels is None:
            raise ValueError("per_token_loss: kind 'ce' needs labels")
        return cross_entropy(student_logits, labels, ignore_index=ignore_index, tp_group=tp_group)
    if kind not in LOSS_KINDS:
        raise ValueError(f"per_token_loss: unknown kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
    if teacher_logits is None:
        raise ValueError(f"per_token_loss: kind {kind!r} needs teacher_logits")
    if kind == "tail":
        return tail_divergence(student_logits,
                               teacher_logits,
                               top_k=top_k,
                               beta=beta,
                               temperature=temperature,
                               tp_group=tp_group)
    divergence = forward_kl if kind == "kl" else reverse_kl
    return divergence(student_logits, teacher_logits, temperature=temperature, tp_group=tp_group)


__all__ = [
    "LOSS_KINDS",
    "TailDivergence",
    "TailParts",
    "cross_entropy",
    "forward_kl",
    "per_token_loss",
    "reverse_kl",
    "tail_divergence",
    "tail_divergence_parts",
]
