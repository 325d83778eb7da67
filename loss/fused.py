"""The output layers fused with the objective: logits exist one row chunk at a time, never whole.

:func:`fused_objective` takes both models' final hidden states at the valid positions and their
output layers on this rank's vocabulary slice (weight, bias, the family's final soft-cap) and
returns the summed objective of :func:`loss.objective.distillation_objective` on the logits those
layers would make, without ever holding ``[tokens, V_local]`` logits. Per chunk of ``R`` rows
(:func:`chunk_rows`): both heads' logits for the chunk, the divergence's statistics through its own
single exchange (the same ops and the same collective as the unfused path, on ``R`` tokens), the
gradient of the chunk's loss with respect to its logits at once, and from it the chunk's share of
the gradients for the student's hidden states (``dz @ W``) and head weight (``dzᵀ @ h``,
accumulated in fp32). Backward only scales what forward formed by the upstream scalar and
all-reduces the hidden-state gradient over the tensor-parallel group, once per call: the all-reduce
AutoTP's column-parallel head ran in its own backward. This is Liger-Kernel's fused-linear layout
(gradients in forward, chunk by chunk) made vocabulary-parallel and tail-aware.

Every rank of the group runs the same number of chunks (``R`` depends on the token count, the
largest slice and the device type only), so the per-chunk collectives pair up. The per-token values
equal the unfused path's up to the rounding of a row-chunked matmul (bit-equal in fp32 on CPU here).
Cross-entropy parts use :func:`exchanged_cross_entropy` (one all-gather of 2 numbers per token, no
host sync) instead of DeepSpeed's op, which validates its bounds with a host read on every call:
per chunk, that would be a host sync per chunk.
"""

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from core.tokens import IGNORE_INDEX
from loss.objective import assemble, divergence_outputs, sequence_beta
from loss.registry import divergence
from loss.tail import tail_divergence_parts
from model_parallel import VocabShard, all_reduce_sum, gather_rows, global_argmax, is_parallel

# Logits per chunk (R x V_local). Each chunk re-reads both heads' weights for its GEMMs, so a chunk
# needs enough rows to keep them compute-bound: on CUDA a 256 MB fp32 block (R = 256 at V_local =
# 256k); on CPU 4 MB (R = 32 at 32k; measured on this 2-core machine at V 16k, H 128: 32-row chunks
# cost 1.5-2x the unfused GEMM time, 64-128-row chunks about 1x). Either way a step's logits path
# stays under a quarter of one micro-batch's logits at the token counts the planner plans for.
# Tests set them to 1 to cross every chunk boundary.
CHUNK_NUMEL = 1 << 26
CPU_CHUNK_NUMEL = 1 << 20

_NEG_INF = float("-inf")


def chunk_rows(tokens: int, vocab_local_max: int, device_type: str) -> int:
    """Rows per chunk: the chunk budget over the largest vocabulary slice, at least 1, at most ``tokens``.
    Depends on nothing that differs between the ranks of a tensor-parallel group."""
    budget = CPU_CHUNK_NUMEL if device_type == "cpu" else CHUNK_NUMEL
    return max(1, min(tokens, budget // max(1, vocab_local_max)))


def buffer_bytes(tokens: int, vocab_local: int, hidden: int, w: int, device_type: str, *, kind: str = "tail",
                 softcap: bool = False) -> float:
    """Bytes the fused logits path holds at its peak on one rank (the planner's logits term, a bound):
    one chunk's student and teacher logits and the gradient of the student's (``w`` bytes each, one
    more for the soft-cap's tanh), the divergence's own temporaries on that chunk (its registry
    entry's :meth:`~loss.registry.Divergence.buffer_bytes`), the fp32 head-weight gradient
    accumulator ``[V_local, H]`` and the fp32 hidden-state gradient ``[tokens, H]``. Nothing
    ``[tokens, V_local]``."""
    rows = chunk_rows(tokens, vocab_local, device_type)
    return ((3 + int(softcap)) * w * rows * vocab_local +
            divergence(kind).buffer_bytes(rows, vocab_local, w, device_type) +
            4 * vocab_local * hidden + 4 * tokens * hidden)


@dataclass(frozen=True)
class OutputLayer:
    """One model's output layer on this rank's vocabulary slice: ``softcap(hidden @ weight.T + bias)``."""

    weight: torch.Tensor
    """``[V_local, H]``; for the student the ``nn.Parameter`` itself, so its gradient reaches the
    parameter's own hooks (DeepSpeed's ZeRO reduce)."""
    bias: Optional[torch.Tensor] = None
    """``[V_local]`` or None."""
    softcap: Optional[float] = None
    """The family's final logit soft-cap ``c`` (logits ``c·tanh(z/c)``, Gemma-2), or None."""


def _head_logits(hidden: torch.Tensor, layer: OutputLayer, first_pad: int):
    """``(logits, squashed)``: ``[R, V_local]`` logits in the weight's dtype, computed as the model's
    own head computes them (the soft-cap as transformers' Gemma-2: divide, tanh, multiply), padded
    columns (``>= first_pad``) at -inf; ``squashed`` the tanh output (for the soft-cap's derivative) or None."""
    logits = F.linear(hidden, layer.weight, layer.bias)  # (R, V_local)
    squashed = None
    if layer.softcap is not None:
        squashed = torch.tanh(logits / layer.softcap)
        logits = squashed * layer.softcap
    if first_pad < logits.shape[-1]:
        logits[:, max(first_pad, 0):] = _NEG_INF
    return logits, squashed


def non_finite(*logits) -> torch.Tensor:
    """0-dim bool on the logits' device: NaN or +inf in any of ``logits`` (None skipped; -inf is padding).

    From each tensor's fp32 sum, so no ``[n, V_local]`` mask is made: NaN, or +inf meeting -inf
    padding, gives NaN; +inf alone gives +inf; finite logits and -inf padding give a finite sum or
    -inf. The unfused step checks whole slices with it, the fused path each chunk."""
    sums = torch.stack([x.detach().sum(dtype=torch.float32) for x in logits if x is not None])
    return (torch.isnan(sums) | torch.isposinf(sums)).any()


class _ExchangedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy on vocabulary slices: one all-gather of (local log-sum-exp, target
    logit) per token, no host sync; backward local, ``softmax − onehot``."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, shard: VocabShard):
        x = logits.float()  # (R, V_local)
        local = targets - shard.start
        owned = (local >= 0) & (local < shard.size)
        index = torch.where(owned, local, torch.zeros_like(local)).unsqueeze(1)  # (R, 1), in range
        target = torch.where(owned, x.gather(1, index).squeeze(1), torch.full_like(x[:, 0], _NEG_INF))
        gathered = gather_rows(torch.stack([torch.logsumexp(x, dim=1), target], dim=1), tp_group)  # (R, TP, 2)
        log_z = torch.logsumexp(gathered[:, :, 0], dim=1)
        valid = targets != IGNORE_INDEX
        ce = torch.where(valid, log_z - gathered[:, :, 1].amax(dim=1), torch.zeros_like(log_z))
        ctx.save_for_backward(logits, log_z, index, owned & valid, valid)
        return ce

    @staticmethod
    def backward(ctx, grad):
        logits, log_z, index, owned, valid = ctx.saved_tensors
        weight = torch.where(valid, grad.float(), torch.zeros_like(grad, dtype=torch.float32)).unsqueeze(1)
        out = torch.exp(logits.float() - log_z.unsqueeze(1)).mul_(weight)  # (R, V_local)
        out.scatter_add_(1, index, -weight * owned.unsqueeze(1))
        return out.to(logits.dtype), None, None, None


def exchanged_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, tp_group, shard: VocabShard):
    """Per-token cross-entropy (fp32, 0 where ``targets == IGNORE_INDEX``) on ``[R, V_local]`` slices,
    equal to :func:`loss.cross_entropy`; a target outside the vocabulary gives +inf (no bounds check:
    that would be a host read)."""
    return _ExchangedCrossEntropy.apply(logits, targets, tp_group, shard)


@dataclass
class _Call:
    """Everything :func:`fused_objective` was given besides the tensors it differentiates."""

    teacher_hidden: Optional[torch.Tensor]
    student: OutputLayer
    teacher: Optional[OutputLayer]
    targets: torch.Tensor
    kind: str
    top_k: int
    beta: float
    beta_mode: str
    temperature: float
    ce_weight: float
    sequence_ids: Optional[torch.Tensor]
    num_sequences: Optional[int]
    tp_group: object
    shard: VocabShard
    real_vocab_size: int
    needs_grad: bool
    token_weights: Optional[torch.Tensor] = None
    out: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def first_pad(self) -> int:
        return self.real_vocab_size - self.shard.start

    def rows(self, tokens: int, device: torch.device) -> Iterator[slice]:
        """The chunks; one empty chunk when there are no tokens, so the outputs keep their names."""
        tp = torch.distributed.get_world_size(self.tp_group) if is_parallel(self.tp_group) else 1
        step = chunk_rows(tokens, -(-self.shard.global_size // tp), device.type)
        for start in range(0, max(tokens, 1), step):
            yield slice(start, min(tokens, start + step))


def _token_beta(call: _Call, tokens: int, device) -> Optional[torch.Tensor]:
    """β per token for ``beta_mode`` ``sequence`` (:func:`loss.objective.sequence_beta`), which needs
    every token's teacher tail mass before any chunk's gradient: a teacher-only pass over the chunks
    (one more teacher head matmul and one exchange per chunk). None for a constant β."""
    if call.beta_mode != "sequence" or not divergence(call.kind).uses_beta:
        return None
    masses = []
    for rows in call.rows(tokens, device):
        teacher, _ = _head_logits(call.teacher_hidden[rows], call.teacher, call.first_pad)
        parts = tail_divergence_parts(teacher, teacher, top_k=call.top_k, temperature=call.temperature,
                                      tp_group=call.tp_group, shard=call.shard)
        masses.append(parts.teacher_tail_mass)
    return sequence_beta(call.beta, torch.cat(masses), call.sequence_ids, call.num_sequences)


def _chunk_objective(call: _Call, student, teacher, targets, token_beta, weights):
    """The chunk's per-token outputs (detached) and the gradient of its summed (``weights``-weighted,
    ``[R]`` or None) loss with respect to its student logits (None without grad): the unfused
    objective's own ops on ``R`` rows."""
    beta_for = (lambda mass: call.beta) if token_beta is None else (lambda mass: token_beta)  # noqa: E731
    with torch.enable_grad():
        leaf = student.detach().requires_grad_(call.needs_grad)
        out = divergence_outputs(leaf, teacher, kind=call.kind, top_k=call.top_k, beta_for=beta_for,
                                 temperature=call.temperature, tp_group=call.tp_group, shard=call.shard,
                                 donate_teacher=True)
        if "kd" not in out or call.ce_weight > 0:
            out["ce"] = exchanged_cross_entropy(leaf, targets, tp_group=call.tp_group, shard=call.shard)
        assemble(out, temperature=call.temperature, ce_weight=call.ce_weight)
        if teacher is not None:  # before backward, which may reuse the teacher's storage
            for name, logits in (("student_top1", student), ("teacher_top1", teacher)):
                if name not in out:
                    out[name] = global_argmax(logits, call.shard.start, call.tp_group)
        summed = (out["loss"] if weights is None else out["loss"] * weights).sum()
        grad = torch.autograd.grad(summed, leaf)[0] if call.needs_grad else None
    return {name: value.detach() for name, value in out.items()}, grad


@functools.lru_cache(maxsize=None)
def _has_mixed_gemm(device_type: str) -> bool:
    """Whether ``device_type`` registers GEMMs taking bf16/fp16 and writing fp32 (torch >= 2.8 on CUDA;
    not on CPU): asked of the dispatcher, not by trying one (a GEMM can fail for other reasons)."""
    try:
        key = torch._C._dispatch_key_for_device(device_type)
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                   for op in ("aten::mm.dtype", "aten::addmm.dtype", "aten::addmm.dtype_out"))
    except (AttributeError, RuntimeError):
        return False


def _accumulate(accumulator: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> None:
    """``accumulator += mat1 @ mat2`` in the accumulator's fp32 (a low-precision running sum would
    drop later chunks' contributions). bf16 inputs: in place through an fp32-output GEMM where the
    device has one (CUDA), else the product in the inputs' dtype and its fp32 copy (CPU: two
    ``[V_local, H]`` transients per chunk, which the planner counts)."""
    if mat1.dtype == accumulator.dtype:
        accumulator.addmm_(mat1, mat2)
    elif _has_mixed_gemm(accumulator.device.type):
        torch.addmm(accumulator, mat1, mat2, out_dtype=accumulator.dtype, out=accumulator)
    else:
        accumulator.add_(torch.mm(mat1, mat2).float())


def _forward_chunks(call: _Call, student_hidden: torch.Tensor):
    """The loop over chunks: the summed loss, the per-token outputs and, with ``needs_grad``, the
    fp32 gradients of the summed loss for the hidden rows ``[n, H]``, the weight and the bias."""
    tokens, device, weight = student_hidden.shape[0], student_hidden.device, call.student.weight
    grad_hidden = grad_weight = grad_bias = None
    if call.needs_grad:
        grad_hidden = torch.empty(student_hidden.shape, dtype=torch.float32, device=device)  # (n, H)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)  # (V_local, H)
        if call.student.bias is not None:
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device)
    token_beta = _token_beta(call, tokens, device)
    pieces, bad = {}, torch.zeros((), dtype=torch.bool, device=device)
    for rows in call.rows(tokens, device):
        hidden = student_hidden[rows]  # (R, H)
        student, squashed = _head_logits(hidden, call.student, call.first_pad)  # (R, V_local)
        teacher = None
        if call.teacher is not None:
            teacher, _ = _head_logits(call.teacher_hidden[rows], call.teacher, call.first_pad)
        bad |= non_finite(student, teacher)
        out, grad = _chunk_objective(call, student, teacher, call.targets[rows],
                                     None if token_beta is None else token_beta[rows],
                                     None if call.token_weights is None else call.token_weights[rows])
        for name, value in out.items():
            pieces.setdefault(name, []).append(value)
        del student, teacher
        if grad is None:
            continue
        if squashed is not None:  # d(c·tanh(z/c))/dz = 1 − tanh²
            grad = grad.float().mul_(1 - squashed.float().square_()).to(weight.dtype)
        del squashed
        grad_hidden[rows] = torch.mm(grad, weight).float()
        _accumulate(grad_weight, grad.t(), hidden)
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0, dtype=torch.float32)
        del grad
    call.out.update({name: torch.cat(values) for name, values in pieces.items()})
    call.out["bad"] = bad
    loss = call.out["loss"] if call.token_weights is None else call.out["loss"] * call.token_weights
    return loss.sum(), (grad_hidden, grad_weight, grad_bias)


class _FusedHeads(torch.autograd.Function):

    @staticmethod
    def forward(ctx, student_hidden, weight, bias, call: _Call):
        total, ctx.grads = _forward_chunks(call, student_hidden)
        ctx.tp_group, ctx.dtypes = call.tp_group, (student_hidden.dtype, weight.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        scale = grad_total.float()
        # The only collective of backward: each rank's slice contributed its share of dL/dh.
        grad_hidden = all_reduce_sum(grad_hidden.mul_(scale), ctx.tp_group).to(ctx.dtypes[0])
        grad_weight = grad_weight.mul_(scale).to(ctx.dtypes[1])
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(scale).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None


def fused_objective(student_hidden: torch.Tensor,
                    student: OutputLayer,
                    teacher_hidden: Optional[torch.Tensor],
                    teacher: Optional[OutputLayer],
                    targets: torch.Tensor,
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
                    shard: VocabShard,
                    real_vocab_size: Optional[int] = None,
                    token_weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The summed objective over ``n`` tokens from both models' hidden rows, chunk by chunk.

    Args:
        student_hidden: ``[n, H]``, the student's final hidden states at the valid positions.
        student: its output layer on this rank's slice (``weight`` the parameter itself).
        teacher_hidden, teacher: ``[n, H_t]`` and the teacher's layer, or None for a kind without a
            teacher (``ce``); never differentiated.
        targets: ``[n]`` global target ids.
        kind, top_k, beta, beta_mode, temperature, ce_weight, sequence_ids, num_sequences, tp_group:
            as for :func:`loss.objective.distillation_objective`.
        shard: this rank's vocabulary slice of both heads (``weight.shape[0] == shard.size``).
        real_vocab_size: columns at and past it (global ids) are padding: -inf logits, no gradient.
        token_weights: ``[n]``, each token's weight in ``total`` (on-policy: 0 after a continuation's
            EOS); None: all 1. The per-token outputs stay unweighted.

    Returns:
        ``(total, out)``: ``total`` 0-dim fp32, ``Σ_t w_t·loss_t`` of
        :func:`~loss.objective.distillation_objective` on the logits the layers make, differentiable
        with respect to ``student_hidden``, ``student.weight`` and ``student.bias`` only; its
        backward runs one all-reduce of ``[n, H]`` over ``tp_group`` and nothing else. ``out``: the
        detached per-token ``[n]`` outputs (``loss``, ``kd``, ``ce``, the kind's registry outputs, and
        with a teacher ``student_top1`` / ``teacher_top1``) and ``bad``, a 0-dim bool: NaN or +inf in
        this rank's own logits.
    """
    if student.weight.shape[0] != shard.size:
        raise ValueError(f"fused_objective: the student's head holds {student.weight.shape[0]} vocabulary rows, "
                         f"not this rank's slice {shard}")
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student.weight, student.bias))
    call = _Call(teacher_hidden=None if teacher_hidden is None else teacher_hidden.detach(), student=student,
                 teacher=teacher, targets=targets, kind=kind, top_k=top_k, beta=beta, beta_mode=beta_mode,
                 temperature=float(temperature), ce_weight=ce_weight, sequence_ids=sequence_ids,
                 num_sequences=num_sequences, tp_group=tp_group, shard=shard,
                 real_vocab_size=shard.global_size if real_vocab_size is None else real_vocab_size,
                 needs_grad=needs_grad, token_weights=token_weights)
    total = _FusedHeads.apply(student_hidden, student.weight, student.bias, call)
    return total, call.out


@torch.no_grad()
def logit_chunks(student_hidden: torch.Tensor,
                 student: OutputLayer,
                 teacher_hidden: Optional[torch.Tensor],
                 teacher: Optional[OutputLayer],
                 *,
                 shard: VocabShard,
                 real_vocab_size: Optional[int] = None,
                 tp_group=None) -> Iterator[Tuple[slice, torch.Tensor, Optional[torch.Tensor]]]:
    """``(rows, student_logits, teacher_logits)`` chunk by chunk, ``[R, V_local]`` each, as the fused
    objective makes them (padding at -inf, soft-capped): for evaluation, which computes its metrics
    per chunk and so never holds a whole micro-batch's logits. Same chunks on every rank of ``tp_group``."""
    call = _Call(teacher_hidden=teacher_hidden, student=student, teacher=teacher, targets=None, kind="ce", top_k=0,
                 beta=0.0, beta_mode="constant", temperature=1.0, ce_weight=0.0, sequence_ids=None,
                 num_sequences=None, tp_group=tp_group, shard=shard,
                 real_vocab_size=shard.global_size if real_vocab_size is None else real_vocab_size, needs_grad=False)
    for rows in call.rows(student_hidden.shape[0], student_hidden.device):
        logits, _ = _head_logits(student_hidden[rows], student, call.first_pad)
        other = None if teacher is None else _head_logits(teacher_hidden[rows], teacher, call.first_pad)[0]
        yield rows, logits, other
