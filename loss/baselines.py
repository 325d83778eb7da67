"""The baselines, in the call shape of :func:`loss.tail_divergence`, on DeepSpeed's own ops.

Forward/reverse KL wrap ``deepspeed.sequence.vocab_parallel_ops.vocab_parallel_kl_div`` and
cross-entropy wraps ``deepspeed.sequence.cross_entropy.vocab_parallel_cross_entropy``: we only add
temperature, a detached teacher and the uneven-slice layout. DeepSpeed's collectives go through
``deepspeed.comm``, so with a ``tp_group`` the process group must come from
``deepspeed.init_distributed``. DeepSpeed is imported on first use: ``import loss`` stays light.
"""

from typing import Optional

import torch

from core.tokens import IGNORE_INDEX
from model_parallel import VocabShard, resolve_vocab_shard


def _kl(student_logits, teacher_logits, temperature, tp_group, reverse):
    from deepspeed.sequence.vocab_parallel_ops import vocab_parallel_kl_div

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    inv_t = 1.0 / temperature
    return vocab_parallel_kl_div(student_logits * inv_t,
                                 teacher_logits.detach() * inv_t,
                                 reverse=reverse,
                                 tp_group=tp_group)


def forward_kl(student_logits: torch.Tensor,
               teacher_logits: torch.Tensor,
               *,
               temperature: float = 1.0,
               tp_group=None) -> torch.Tensor:
    """Per-token KL(p‖q), teacher p, student q, both at temperature τ; fp32, replicated over the
    group, no reduction, no τ² factor; the teacher gets no gradient."""
    return _kl(student_logits, teacher_logits, temperature, tp_group, reverse=False)


def reverse_kl(student_logits: torch.Tensor,
               teacher_logits: torch.Tensor,
               *,
               temperature: float = 1.0,
               tp_group=None) -> torch.Tensor:
    """Per-token KL(q‖p) (mode-seeking); otherwise as :func:`forward_kl`."""
    return _kl(student_logits, teacher_logits, temperature, tp_group, reverse=True)


def kl_buffer_bytes(tokens: int, vocab_local: int, w: int, device_type: str) -> float:
    """Bytes of :func:`forward_kl` / :func:`reverse_kl`'s temporaries alive at once, forward or
    backward, on ``tokens × vocab_local`` logits of ``w`` bytes (the planner's bound for ``kl`` and
    ``reverse_kl``). DeepSpeed's op is not chunked: it holds about seven ``[tokens, V_local]`` fp32
    tensors at its peak (the τ-scaled copies, both log-softmaxes, the teacher's probabilities, the
    product and, in backward, its gradient), counted on CPU with fp32 and bf16 logits, with and without
    a final soft-cap (``tests/test_plan_fused_logits.py``, ``tests/test_saved_bytes.py``): 9 fp32
    tensors bound fp32 logits, 7 bound bf16 ones. ``device_type`` does not change it."""
    return (9 if w == 4 else 7) * 4 * tokens * vocab_local


def cross_entropy(student_logits: torch.Tensor,
                  labels: torch.Tensor,
                  *,
                  ignore_index: int = IGNORE_INDEX,
                  tp_group=None,
                  shard: Optional[VocabShard] = None) -> torch.Tensor:
    """Per-token cross-entropy against ``labels`` (``logits.shape[:-1]``, global token ids).

    fp32, replicated over the group, 0 where ``labels == ignore_index``, no reduction. Uneven
    vocabulary slices are supported: the layout is resolved collectively (or taken from ``shard``,
    resolved once by the caller) and passed explicitly. DeepSpeed's op still validates the bounds
    it is given with a collective and a host read of its own on every call.
    """
    from deepspeed.sequence.cross_entropy import vocab_parallel_cross_entropy

    if shard is None:
        shard = resolve_vocab_shard(student_logits.shape[-1], tp_group, caller="cross_entropy",
                                    device=student_logits.device)
    return vocab_parallel_cross_entropy(student_logits,
                                        labels,
                                        tp_group=tp_group,
                                        vocab_start_index=shard.start,
                                        vocab_end_index=shard.start + shard.size,
                                        global_vocab_size=shard.global_size,
                                        ignore_index=ignore_index,
                                        reduction="none")
