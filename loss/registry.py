"""Every ``loss.kind`` the job knows: one entry each, with what the job and the config check need.

Adding a divergence is one :class:`Divergence` in :data:`LOSSES`: a function from the two logit
slices to per-token tensors holding at least ``"kd"`` (the divergence D, float32, no reduction, no
τ²), plus the flags that say which inputs and settings it uses. ``distillation_objective``, the
run config's ``loss.kind`` check and the README (checked by a test) all read this table.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from loss import tail
from loss.baselines import forward_kl, reverse_kl
from loss.tail import tail_divergence_parts


def _two_argmaxes(top_k: int, vocab: int) -> int:
    # A divergence whose pass gives no argmax: the step takes each model's (global_argmax, 2 numbers).
    return 4


@dataclass(frozen=True)
class Divergence:
    """One ``loss.kind``."""

    name: str
    summary: str
    """One line for ``--help`` texts and the README."""
    compute: Optional[Callable]
    """``compute(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher) -> {"kd": [n], ...}``;
    ``beta_for(teacher_tail_mass)`` gives the tail weight (a number, or per token); ``shard`` is this
    rank's :class:`model_parallel.VocabShard` where the caller resolved it once (else None);
    ``donate_teacher`` lets backward reuse the teacher's storage for the student's gradient (the
    caller does not read the teacher's logits after backward); a divergence may ignore it. It may
    add ``student_top1`` / ``teacher_top1`` (global argmax ids) where its own pass gives them for
    free. None: no divergence (cross-entropy only)."""
    uses_top_k: bool = False
    """Whether ``loss.top_k``, ``loss.beta`` and ``loss.beta_mode`` apply."""
    exchange: Callable[[int, int], int] = _two_argmaxes
    """:meth:`exchange_numbers`' formula, ``(top_k, vocab) -> int``."""
    buffers: Callable[[int, int, int, str], float] = tail.buffer_bytes
    """:meth:`buffer_bytes`' formula; the tail divergence's bound unless a kind has its own."""

    @property
    def needs_teacher(self) -> bool:
        return self.compute is not None

    def exchange_numbers(self, top_k: int, vocab: int) -> int:
        """fp32 numbers a training step exchanges across the tensor-parallel group per position with
        a target (the planner's loss traffic): the divergence's own statistics and both models'
        argmax for the top-1 agreement metric. ``tail``: ``5 + 3K`` (both argmaxes ride along; 2
        more for the teacher's at K = 0); the others: the two argmaxes, 2 numbers each."""
        return self.exchange(top_k, vocab)

    def buffer_bytes(self, tokens: int, vocab_local: int, w: int, device_type: str) -> float:
        """Bytes of the loss's fp32 row-chunk buffers on the logits path (the planner's logits term),
        for ``tokens`` positions of ``vocab_local`` logits of ``w`` bytes on ``device_type``.
        ``kl``, ``reverse_kl`` and ``ce`` reuse the tail divergence's bound as an estimate (DeepSpeed's
        ops are not chunked; their temporaries are not modelled separately)."""
        return self.buffers(tokens, vocab_local, w, device_type)


def _tail(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher) -> Dict:
    parts, top1 = tail_divergence_parts(student, teacher, top_k=top_k, temperature=temperature, tp_group=tp_group,
                                        shard=shard, donate_teacher=donate_teacher, return_top1=True)
    out = parts._asdict()
    # By-products of the same pass: the agreement metric needs no second read of the logits.
    out["student_top1"] = top1.student
    if top1.teacher is not None:
        out["teacher_top1"] = top1.teacher
    out["kd"] = parts.head_kl + beta_for(parts.teacher_tail_mass) * parts.tail_kl
    return out


def _kl(divergence):

    def compute(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher) -> Dict:
        # DeepSpeed's op resolves (and checks) the layout itself on every call.
        return {"kd": divergence(student, teacher, temperature=temperature, tp_group=tp_group)}

    return compute


LOSSES: Dict[str, Divergence] = {entry.name: entry for entry in (
    Divergence("tail", "tail-aware divergence KL(p̂‖q̂) + β·KL(p̃‖q̃) over the teacher's top-K (ours)", _tail,
               uses_top_k=True, exchange=tail.exchange_numbers),
    Divergence("kl", "forward KL(p‖q), DeepSpeed's vocab_parallel_kl_div", _kl(forward_kl)),
    Divergence("reverse_kl", "reverse KL(q‖p), mode-seeking", _kl(reverse_kl)),
    Divergence("ce", "cross-entropy on the labels only, no teacher", None),
)}


def divergence(kind: str, key: str = "loss.kind") -> Divergence:
    """The entry named ``kind``; ``ValueError`` naming ``key`` and the valid names otherwise."""
    if kind not in LOSSES:
        raise ValueError(f"{key}: unknown {kind!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[kind]
