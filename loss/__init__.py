"""Distillation losses on (optionally vocabulary-sharded) logits; each returns per-token values.

``tail_divergence`` is the tail-aware divergence (ours); ``forward_kl``, ``reverse_kl`` and
``cross_entropy`` are DeepSpeed's vocabulary-parallel ops behind the same call shape.
:data:`LOSSES` (``loss/registry.py``) names the job's ``loss.kind``\\ s, one :class:`Divergence`
each; :func:`loss.objective.distillation_objective` is the job's loss built from one of them.
"""

from loss.baselines import cross_entropy, forward_kl, reverse_kl
from loss.registry import LOSSES, Divergence
from loss.tail import TailParts, TopOne, combine, tail_divergence, tail_divergence_parts

__all__ = [
    "Divergence",
    "LOSSES",
    "TailParts",
    "TopOne",
    "combine",
    "cross_entropy",
    "forward_kl",
    "reverse_kl",
    "tail_divergence",
    "tail_divergence_parts",
]
