"""Every ``loss.kind`` the job knows: one entry each, answering everything the rest of the code asks
about a kind, so that nothing outside ``loss/`` compares with a kind's name (a test checks).

Adding a divergence is one :class:`Divergence` in :data:`LOSSES`: a function from the two logit
slices to per-token tensors holding at least ``"kd"`` (the divergence D, float32, no reduction, no
τ²), the other outputs it logs, the evaluation metrics those outputs already are, the flags that say
which inputs and settings it uses, and what it costs the planner. ``distillation_objective``, the
run config's ``loss.kind`` check, the training step, the planner, ``eval.report``, ``eval.sweep``
and the README (checked by a test) all read this table.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from loss import tail
from loss.baselines import forward_kl, kl_buffer_bytes, reverse_kl
from loss.tail import TailParts, tail_divergence_parts


def _two_argmaxes(top_k: int, vocab: int) -> int:
    # A divergence whose pass gives no argmax: the step takes each model's (global_argmax, 2 numbers).
    return 4


def _no_metrics(out: Dict, beta: float) -> Dict:
    return {}


@dataclass(frozen=True)
class Divergence:
    """One ``loss.kind``."""

    name: str
    """The ``loss.kind`` value; runs, reports and sweep settings are named by it."""
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
    """Whether ``loss.top_k`` applies (reports show K, and the sweep varies it, for such kinds only)."""
    uses_beta: bool = False
    """Whether ``loss.beta`` and ``loss.beta_mode`` apply (reports show β, the sweep varies β and the
    β mode, and the fused head runs its teacher-only pass for ``beta_mode: sequence``, for such kinds
    only); the others ignore both keys."""
    outputs: Tuple[str, ...] = ()
    """The per-token float32 tensors ``compute`` returns besides ``kd``; the step logs their means."""
    metrics: Callable[[Dict, float], Dict] = _no_metrics
    """``metrics(out, beta)``: the evaluation metrics (:class:`loss.metrics.EvalSums`' names) that
    ``compute``'s output ``out`` at temperature 1 already holds, with the metric's constant ``beta``,
    so the evaluation does not compute them again."""
    compare_temperatures: bool = False
    """Whether the paper's comparison (``eval.sweep``) trains this kind at each of its temperatures
    (otherwise at the config's)."""
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
        argmax for the top-1 agreement metric. ``tail`` and ``topk_bucket`` (one pass): ``5 + 3K``
        (both argmaxes ride along; 2 more for the teacher's at K = 0); the others: the two argmaxes,
        2 numbers each."""
        return self.exchange(top_k, vocab)

    def buffer_bytes(self, tokens: int, vocab_local: int, w: int, device_type: str) -> float:
        """Bytes of the loss's fp32 row-chunk buffers on the logits path (the planner's logits term),
        for ``tokens`` positions of ``vocab_local`` logits of ``w`` bytes on ``device_type``.
        ``kl`` and ``reverse_kl``: DeepSpeed's op, not chunked (:func:`loss.baselines.kl_buffer_bytes`,
        held to counted bytes); ``ce`` reuses the tail divergence's bound as an estimate."""
        return self.buffers(tokens, vocab_local, w, device_type)


def _tail_pass(student, teacher, *, top_k, temperature, tp_group, shard, donate_teacher) -> Tuple[Dict, TailParts]:
    parts, top1 = tail_divergence_parts(student, teacher, top_k=top_k, temperature=temperature, tp_group=tp_group,
                                        shard=shard, donate_teacher=donate_teacher, return_top1=True)
    out = parts._asdict()
    # By-products of the same pass: the agreement metric needs no second read of the logits.
    out["student_top1"] = top1.student
    if top1.teacher is not None:
        out["teacher_top1"] = top1.teacher
    return out, parts


def _tail(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher) -> Dict:
    out, parts = _tail_pass(student, teacher, top_k=top_k, temperature=temperature, tp_group=tp_group, shard=shard,
                            donate_teacher=donate_teacher)
    out["kd"] = parts.divergence(beta_for(parts.teacher_tail_mass))
    return out


def _topk_bucket(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher) -> Dict:
    # β = 0 exactly: D = KL(p̂‖q̂), the (K+1)-category head of the tail divergence's own pass, taken
    # as it is (not head + 0·tail, which is NaN where the tail KL is infinite). ``beta_for`` is never
    # called: loss.beta and loss.beta_mode change nothing. The pass still computes tail_kl (logged,
    # and the evaluation's tail_divergence at its own β reads it); backward gets a zero gradient for
    # it, which adds exactly zero to the student's gradient (a cheaper pass would skip it: the
    # teacher's tail exp in backward, the tail's mean log-ratio in forward).
    out, parts = _tail_pass(student, teacher, top_k=top_k, temperature=temperature, tp_group=tp_group, shard=shard,
                            donate_teacher=donate_teacher)
    out["kd"] = parts.head_kl
    return out


def _tail_metrics(out: Dict, beta: float) -> Dict:
    parts = TailParts(*(out[name] for name in TailParts._fields))
    return {"tail_divergence": parts.divergence(beta), "teacher_tail_mass": parts.teacher_tail_mass,
            "student_tail_mass": parts.student_tail_mass}


def _kl(divergence):

    def compute(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher) -> Dict:
        # DeepSpeed's op resolves (and checks) the layout itself on every call.
        return {"kd": divergence(student, teacher, temperature=temperature, tp_group=tp_group)}

    return compute


def _kd_is(metric: str) -> Callable[[Dict, float], Dict]:
    return lambda out, beta: {metric: out["kd"]}


LOSSES: Dict[str, Divergence] = {entry.name: entry for entry in (
    Divergence("tail", "tail-aware divergence KL(p̂‖q̂) + β·KL(p̃‖q̃) over the teacher's top-K (ours)", _tail,
               uses_top_k=True, uses_beta=True, outputs=TailParts._fields, metrics=_tail_metrics,
               compare_temperatures=True, exchange=tail.exchange_numbers),
    Divergence("topk_bucket", "top-K-plus-one-bucket KL(p̂‖q̂): the tail divergence at β = 0 (`loss.beta` "
               "ignored); the baseline Model-Optimizer, Megatron, TRL and DistillKit ship", _topk_bucket,
               uses_top_k=True, outputs=TailParts._fields, metrics=_tail_metrics, compare_temperatures=True,
               exchange=tail.exchange_numbers),
    Divergence("kl", "forward KL(p‖q), DeepSpeed's vocab_parallel_kl_div", _kl(forward_kl),
               metrics=_kd_is("forward_kl"), compare_temperatures=True, buffers=kl_buffer_bytes),
    Divergence("reverse_kl", "reverse KL(q‖p), mode-seeking", _kl(reverse_kl), metrics=_kd_is("reverse_kl"),
               buffers=kl_buffer_bytes),
    Divergence("ce", "cross-entropy on the labels only, no teacher", None),
)}

BASELINE = "kl"
"""The kind the paper compares the others with: ``eval.sweep``'s paired tests are against its runs
at temperature 1."""


def divergence(kind: str, key: str = "loss.kind") -> Divergence:
    """The entry named ``kind``; ``ValueError`` naming ``key`` and the valid names otherwise."""
    if kind not in LOSSES:
        raise ValueError(f"{key}: unknown {kind!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[kind]
