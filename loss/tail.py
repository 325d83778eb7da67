"""The tail-aware divergence of Dasgupta, Cohn & Baldwin (2026), exact on vocabulary slices.

With p = softmax(t/τ) (teacher), q = softmax(s/τ) (student), T the teacher's top-K ids,
P_tail / Q_tail the mass outside T and p̃, q̃ the renormalised tails (DESIGN.md §1):

    D = KL(p̂‖q̂) + β · KL(p̃‖q̃),   KL(p̂‖q̂) = Σ_{i∈T} p_i log(p_i/q_i) + P_tail log(P_tail/Q_tail)

β = P_tail per token gives the plain forward KL (chain rule of KL).

Layout: every rank of ``tp_group`` holds the same contiguous vocabulary slice of both models'
logits (rank r holds the r-th slice; slices may be uneven and smaller than K).

Algorithm (DESIGN.md §2, in one pass over the logits): each rank proposes its local top-K teacher
candidates and summarises the rest of its slice, its *local tail*, by three numbers: the teacher's
and student's log-sum-exp over it and the mean log-ratio under the teacher's local-tail softmax.
One all-gather of those numbers per token per rank (candidates travel with their teacher logit,
student logit and id), plus the student's local maximum and its id, ``5 + 3K`` in all, lets every
rank pick the same global top-K and fold the candidates left out back into the tail, exactly and
without cancellation. The same pass gives both models' global argmax (the teacher's is the first
of its top-K) for the top-1 agreement metric, so no caller re-reads the logits for it. Forward runs two
all-gathers per call: the argument/layout check (a few numbers per rank, read on the host; skipped
where the caller passes the layout it resolved once) and that one per-token exchange, O(K·TP) bytes
per token whatever the vocabulary size; no other host sync, forward or backward. Every rank returns the same
per-token values and back-propagates the same loss, so backward runs **zero** collectives: each
rank computes its own slice's gradient from its logits and saved per-token statistics.

Numerics: fp32 whatever the input dtype; tail masses are log-sum-exps over the tail entries (shifted
by the tail's own maximum), never log(1 − Σ top), so a teacher whose tail holds 1e-13 of the mass
still gets an exact renormalised tail. ``-inf`` logits carry no mass, get zero gradient and lose
every tie; a row that is ``-inf`` throughout yields D = 0 and a zero gradient.
"""

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from model_parallel import VocabShard, gather_rows, local_topk, rank_candidates, resolve_vocab_shard

# Elementwise work runs on row chunks of at most CHUNK_NUMEL logits, so fp32 temporaries stay a few
# chunk-sized buffers whatever the token count; only per-token statistics span all rows. On CPU
# chunks are smaller still, so that those buffers (1 MiB each) stay in a server's L3 cache between
# passes. Tests set CHUNK_NUMEL to 1 to cross chunk boundaries on every row.
CHUNK_NUMEL = 1 << 24
CPU_CHUNK_NUMEL = 1 << 18

_NEG_INF = float("-inf")


class TopOne(NamedTuple):
    """Each model's most probable token, global ids (int64, the logits' shape minus the last dim),
    ties to the lower id as for the top-K: by-products of the pass the divergence makes."""

    student: torch.Tensor
    teacher: Optional[torch.Tensor]
    """The first of the teacher's top-K; None for K = 0 (no top-K is taken)."""


class TailParts(NamedTuple):
    """Per-token parts of the divergence, each float32 with the logits' shape minus the last dim."""

    head_kl: torch.Tensor
    """KL(p̂‖q̂) over the K+1 categories (top-K and one tail bucket); differentiable."""
    tail_kl: torch.Tensor
    """KL(p̃‖q̃) between the renormalised tails (0 where the teacher's tail is empty); differentiable."""
    teacher_tail_mass: torch.Tensor
    """P_tail, the teacher's probability outside its top-K; no gradient."""
    student_tail_mass: torch.Tensor
    """Q_tail, the student's probability outside the teacher's top-K; no gradient."""

    def divergence(self, beta: Union[float, torch.Tensor]) -> torch.Tensor:
        """``D = head_kl + β·tail_kl`` (:func:`combine`)."""
        return combine(self.head_kl, self.tail_kl, beta)


def combine(head_kl: torch.Tensor, tail_kl: torch.Tensor, beta: Union[float, torch.Tensor]) -> torch.Tensor:
    """The divergence from its parts, ``D = KL(p̂‖q̂) + β·KL(p̃‖q̃)``: the one place it is assembled
    (the loss, the objective and the metrics all call it, so they agree bit for bit). ``beta``: a
    number or a per-token tensor."""
    return head_kl + beta * tail_kl


def _row_chunks(num_rows: int, row_numel: int, device: torch.device):
    limit = min(CHUNK_NUMEL, CPU_CHUNK_NUMEL) if device.type == "cpu" else CHUNK_NUMEL
    step = max(1, limit // max(1, row_numel))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _normaliser(log_z: torch.Tensor) -> torch.Tensor:
    """A log-normaliser safe to subtract: ``-inf`` (no mass at all) becomes ``+inf``, so that
    ``exp(x - normaliser)`` is 0 for every x, including ``-inf``, instead of NaN."""
    return torch.where(log_z == _NEG_INF, torch.full_like(log_z, float("inf")), log_z)


def _log_ratio(log_num: torch.Tensor, log_den: torch.Tensor) -> torch.Tensor:
    """log(num/den) of two masses given as logs; -inf when the numerator's mass is 0."""
    ratio = log_num - torch.where(log_den == _NEG_INF, torch.zeros_like(log_den), log_den)
    return torch.where(log_num == _NEG_INF, torch.full_like(ratio, _NEG_INF), ratio)


def _scaled_exp(x: torch.Tensor, shift: torch.Tensor, inv_t: float, out=None) -> torch.Tensor:
    """``exp(x·inv_t − shift)`` in one pass plus the exp (``shift`` is ``[R, 1]``)."""
    return torch.add(-shift, x, alpha=inv_t, out=out).exp_()


def _owned_writes(top_ids: torch.Tensor, values: torch.Tensor, shard: VocabShard):
    """``(columns, writes, keep_first)`` that make ``grad[r, id − shard.start] = values[r, j]`` for
    each chosen id ``top_ids[r, j]`` this rank holds one ``scatter_`` of fixed shape (``[N, K]``; no
    boolean-mask indexing, no host sync), computed once for all rows.

    An id held elsewhere is redirected to a stand-in write that changes nothing: the row's first held
    id with its own value again, or, in a row holding none (``keep_first`` ``[N, 1]``), column 0 with
    the value it already has, which the caller reads per chunk. Duplicate writes of one value are
    well defined.
    """
    local = top_ids - shard.start  # (N, K)
    owned = (local >= 0) & (local < shard.size)
    first = owned.to(torch.uint8).argmax(dim=1, keepdim=True)  # (N, 1) the first held id's place, 0 if none
    holds = owned.gather(1, first)  # (N, 1) whether the row holds any
    columns = torch.where(owned, local, torch.where(holds, local.gather(1, first), 0))  # (N, K), in range
    writes = torch.where(owned, values, values.gather(1, first))  # (N, K)
    return columns, writes, ~holds


# Per-token statistics columns of the exchanged payload, before the 3K candidate columns.
_T_TAIL, _S_TAIL, _MEAN, _S_MAX, _S_MAX_ID, _STATS = range(6)


def exchange_numbers(top_k: int, vocab: int) -> int:
    """fp32 numbers a training step exchanges per position with a target for this divergence: the
    payload's ``5 + 3K`` (K = min(top_k, vocab); the student's argmax is among the 5, the teacher's is
    its first top-K id), plus the 2 of the teacher's argmax at K = 0, where no top-K is taken."""
    k = min(top_k, vocab)
    return _STATS + 3 * k + (2 if k == 0 else 0)


def buffer_bytes(tokens: int, vocab_local: int, w: int, device_type: str) -> float:
    """Bytes of the fp32 row-chunk temporaries alive at once in forward or backward (a bound): 4
    chunk-sized buffers, 2 more for the fp32 copies of the chunks of ``w = 2`` (bf16/fp16) logits.
    A chunk is :data:`CHUNK_NUMEL` logits (:data:`CPU_CHUNK_NUMEL` on ``device_type`` ``cpu``) or all
    ``tokens × vocab_local`` of them where fewer."""
    chunk = min(CPU_CHUNK_NUMEL if device_type == "cpu" else CHUNK_NUMEL, tokens * vocab_local)
    return (4 + (2 if w == 2 else 0)) * 4 * chunk


def _local_statistics(student, teacher, k, shard, inv_t, payload):
    """Fill ``payload`` (``[N, 5 + 3K]``) with this slice's per-token statistics, in one pass.

    Columns: the teacher's and student's log-sum-exp over the *local tail* (the slice minus its
    own top-K teacher candidates), the mean of ``(t − s)/τ`` under the teacher's local-tail
    softmax, the student's largest logit on the slice and its global id, then the K candidates'
    unscaled teacher logits, unscaled student logits and global ids (``-inf`` and ids past the
    vocabulary where the slice has fewer than K entries). Unscaled, so that candidates are ranked
    on the very values every layout's ``local_topk`` compared.
    """
    k_local = min(k, shard.size)
    cand = _STATS  # first candidate column
    payload[:, cand:cand + 2 * k] = _NEG_INF
    # Padding candidates lose every tie to a real id; the ranks together always propose at
    # least K real ones, so padding is never chosen.
    payload[:, cand + 2 * k:] = torch.arange(k, device=payload.device) + shard.global_size
    if shard.size == k_local:  # the whole slice is candidates: no local tail
        payload[:, _T_TAIL:_S_TAIL + 1] = _NEG_INF
        payload[:, _MEAN] = 0.0
    for rows in _row_chunks(student.shape[0], shard.size, student.device):
        t = teacher[rows].float()  # (R, V_local); a view when already fp32, never written
        s = student[rows].float()
        # The first maximum, as global_argmax takes it; while the chunk is in cache.
        s_max, s_max_index = s.max(dim=-1)
        payload[rows, _S_MAX] = s_max
        payload[rows, _S_MAX_ID] = s_max_index + shard.start
        if k_local:
            top_t, top_index, t_tail_max = local_topk(t, k_local)
            payload[rows, cand:cand + k_local] = top_t
            payload[rows, cand + k:cand + k + k_local] = s.gather(1, top_index)
            payload[rows, cand + 2 * k:cand + 2 * k + k_local] = top_index + shard.start
        else:
            t_tail_max = t.amax(dim=-1)
        if shard.size == k_local:
            continue
        # (t − s) on the tail; ±inf/NaN where the teacher has no mass is zeroed (its weight is 0),
        # +inf where only the student has none is kept: KL is infinite there.
        log_ratio = torch.sub(t, s).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=0.0)
        s_tail = s.clone() if student.dtype == torch.float32 else s  # .float() copied already
        if k_local:
            log_ratio.scatter_(1, top_index, 0.0)
            s_tail.scatter_(1, top_index, _NEG_INF)
        s_shift = _finite_or_zero(s_tail.amax(dim=-1, keepdim=True)) * inv_t
        s_sum = _scaled_exp(s_tail, s_shift, inv_t, out=s_tail).sum(dim=-1)
        payload[rows, _S_TAIL] = s_shift.squeeze(1) + torch.log(s_sum)
        t_shift = _finite_or_zero(t_tail_max).unsqueeze(1) * inv_t
        t_weight = _scaled_exp(t, t_shift, inv_t)  # teacher's local tail up to a per-row factor
        if k_local:
            t_weight.scatter_(1, top_index, 0.0)  # candidates may have overflowed; they are not tail
        t_sum = t_weight.sum(dim=-1)
        payload[rows, _T_TAIL] = t_shift.squeeze(1) + torch.log(t_sum)
        weighted = t_weight.mul_(log_ratio).sum(dim=-1) * inv_t
        payload[rows, _MEAN] = torch.where(t_sum > 0, weighted / t_sum, torch.zeros_like(t_sum))


class _TailDivergenceParts(torch.autograd.Function):

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, top_k: int, temperature: float, tp_group, shard: VocabShard,
                donate_teacher: bool):
        num_rows = student_logits.shape[:-1].numel()
        student = student_logits.reshape(num_rows, shard.size)
        teacher = teacher_logits.reshape(num_rows, shard.size)
        inv_t = 1.0 / temperature
        k = min(top_k, shard.global_size)
        # Token ids travel in the same buffer as the logits: exact in fp32 below 2**24.
        payload_dtype = torch.float32 if shard.global_size < 2**24 else torch.float64
        payload = torch.empty(num_rows, _STATS + 3 * k, dtype=payload_dtype, device=student.device)
        _local_statistics(student, teacher, k, shard, inv_t, payload)
        gathered = gather_rows(payload, tp_group)  # (N, TP, 5 + 3K), the only per-token collective
        del payload

        candidates = gathered.shape[1] * k
        cand_t, cand_s, cand_ids = (gathered[:, :, _STATS + i * k:_STATS + (i + 1) * k].reshape(num_rows, candidates)
                                    for i in range(3))
        order = rank_candidates(cand_t, cand_ids.long())
        cand_t, cand_s = (x.gather(1, order).float() * inv_t for x in (cand_t, cand_s))
        top_ids = cand_ids.gather(1, order[:, :k]).long()
        top_t, top_s, rest_t, rest_s = cand_t[:, :k], cand_s[:, :k], cand_t[:, k:], cand_s[:, k:]
        local_tail_t, local_tail_s, local_mean = (gathered[:, :, i].float() for i in (_T_TAIL, _S_TAIL, _MEAN))
        student_ids = gathered[:, :, _S_MAX_ID].long()  # (N, TP)
        student_top1 = student_ids.gather(1, rank_candidates(gathered[:, :, _S_MAX], student_ids)[:, :1]).squeeze(1)
        teacher_top1 = top_ids[:, 0] if k else None
        del gathered

        # The global tail: every rank's local tail plus the proposed candidates not chosen.
        log_tail_t = torch.logsumexp(torch.cat([local_tail_t, rest_t], dim=1), dim=1)
        log_tail_s = torch.logsumexp(torch.cat([local_tail_s, rest_s], dim=1), dim=1)
        tail_norm = _normaliser(log_tail_t).unsqueeze(1)
        rest_log_ratio = torch.where(rest_t == _NEG_INF, torch.zeros_like(rest_t), rest_t - rest_s)
        tail_mean = ((torch.exp(local_tail_t - tail_norm) * local_mean).sum(dim=1) +
                     (torch.exp(rest_t - tail_norm) * rest_log_ratio).sum(dim=1))  # E_p̃[(t − s)/τ]
        log_z_t = torch.logsumexp(torch.cat([log_tail_t.unsqueeze(1), top_t], dim=1), dim=1)
        log_z_s = torch.logsumexp(torch.cat([log_tail_s.unsqueeze(1), top_s], dim=1), dim=1)

        log_p_tail = _log_ratio(log_tail_t, log_z_t)
        log_q_tail = _log_ratio(log_tail_s, log_z_s)
        p_tail, q_tail = torch.exp(log_p_tail), torch.exp(log_q_tail)
        has_tail = p_tail > 0
        zero = torch.zeros_like(p_tail)
        # log p̃_i − log q̃_i = (t_i − s_i)/τ − (A_t − A_s), A the tails' log-sum-exps
        tail_kl = torch.where(has_tail, tail_mean - (log_tail_t - log_tail_s), zero)
        log_p_top = top_t - _normaliser(log_z_t).unsqueeze(1)
        log_q_top = top_s - _normaliser(log_z_s).unsqueeze(1)
        p_top = torch.exp(log_p_top)
        head_terms = torch.where(p_top > 0, p_top * (log_p_top - log_q_top), torch.zeros_like(p_top))
        head_kl = head_terms.sum(dim=1) + torch.where(has_tail, p_tail * (log_p_tail - log_q_tail), zero)

        ctx.mark_non_differentiable(p_tail, q_tail, student_top1)
        ctx.save_for_backward(student_logits, teacher_logits, top_ids, top_t.contiguous(), top_s.contiguous(), log_z_t,
                              log_z_s, log_tail_t, log_tail_s, p_tail, q_tail)
        ctx.shard, ctx.inv_t = shard, inv_t
        # The gradient can take the teacher's storage only where it has the student's layout.
        ctx.donated = (donate_teacher and teacher_logits.dtype == student_logits.dtype and
                       teacher_logits.is_contiguous() and student_logits.is_contiguous())
        return head_kl, tail_kl, p_tail, q_tail, student_top1, teacher_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_head, grad_tail, *_no_gradient):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        (student_logits, teacher_logits, top_ids, top_t, top_s, log_z_t, log_z_s, log_tail_t, log_tail_s, p_tail,
         q_tail) = ctx.saved_tensors
        shard, inv_t = ctx.shard, ctx.inv_t
        num_rows = student_logits.shape[:-1].numel()
        student = student_logits.reshape(num_rows, shard.size)
        teacher = teacher_logits.reshape(num_rows, shard.size)
        grad_head = grad_head.reshape(-1).float()
        # KL(p̃‖q̃) is defined as 0 where the teacher's tail has no mass; so is its gradient.
        grad_tail = torch.where(p_tail > 0, grad_tail.reshape(-1).float(), torch.zeros_like(p_tail))
        # With z = s/τ (the 1/τ is folded into the coefficients):
        # dD/dz_j = g_head·(q_j − p_j)                                     for j ∈ T
        # dD/dz_j = (g_head·(Q_tail − P_tail) + g_tail)·q̃_j − g_tail·p̃_j   for j ∉ T
        coef_q = ((grad_head * (q_tail - p_tail) + grad_tail) * inv_t).unsqueeze(1)
        minus_coef_p = (-grad_tail * inv_t).unsqueeze(1)
        top_grad = (grad_head * inv_t).unsqueeze(1) * (torch.exp(top_s - _normaliser(log_z_s).unsqueeze(1)) -
                                                       torch.exp(top_t - _normaliser(log_z_t).unsqueeze(1)))
        log_tail_s, log_tail_t = _normaliser(log_tail_s).unsqueeze(1), _normaliser(log_tail_t).unsqueeze(1)
        if top_ids.shape[1] > 0:
            top_columns, top_writes, keep_first = _owned_writes(top_ids, top_grad, shard)  # (N, K), (N, K), (N, 1)

        fp32_out = student.dtype == torch.float32
        # A donated teacher buffer is overwritten row chunk by row chunk, each chunk after it is read.
        grad_student = teacher if ctx.donated else torch.empty_like(student)  # (N, V_local), the student's dtype
        for rows in _row_chunks(num_rows, shard.size, student.device):
            # Tail entries sit at or below their own log-sum-exp, so these exps cannot overflow;
            # top-K entries may, and are overwritten below.
            teacher_tail = _scaled_exp(teacher[rows].float(), log_tail_t[rows], inv_t)  # (R, V_local) fp32
            grad = _scaled_exp(student[rows].float(), log_tail_s[rows], inv_t,
                               out=grad_student[rows] if fp32_out else None).mul_(coef_q[rows])
            grad.addcmul_(teacher_tail, minus_coef_p[rows])
            del teacher_tail
            if top_ids.shape[1] > 0:
                # Rows holding none of the chosen ids rewrite column 0 with its own value.
                grad.scatter_(1, top_columns[rows], torch.where(keep_first[rows], grad[:, :1], top_writes[rows]))
            if not fp32_out:
                grad_student[rows] = grad
        return grad_student.view_as(student_logits), None, None, None, None, None, None


def _check_logits(student_logits, teacher_logits, top_k, temperature):
    """The first problem with the arguments other than beta, or None."""
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(logits, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(logits).__name__}"
        if not logits.is_floating_point():
            return f"{name} must be floating point (fp32, bf16 or fp16), got {logits.dtype}"
        if logits.dim() < 1:
            return f"{name} must have a vocabulary dimension, got a 0-d tensor"
    if student_logits.shape != teacher_logits.shape:
        return (f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
                f"must have the same shape (and the same vocabulary slice)")
    if student_logits.device != teacher_logits.device:
        return (f"student_logits ({student_logits.device}) and teacher_logits ({teacher_logits.device}) "
                f"are on different devices")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        return f"top_k must be an integer >= 0, got {top_k!r}"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        return f"temperature must be a number > 0, got {temperature!r}"
    return None


def _check_beta(beta, token_shape):
    """The problem with beta (a number or a tensor broadcastable to ``token_shape``), or None."""
    if isinstance(beta, torch.Tensor):
        try:
            broadcast = torch.broadcast_shapes(beta.shape, token_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != token_shape:
            return f"beta of shape {tuple(beta.shape)} does not broadcast to the per-token shape {tuple(token_shape)}"
        # host sync: a per-token beta (loss.beta_mode sequence) is checked once per call.
        if beta.numel() and not bool(((beta >= 0) & torch.isfinite(beta)).all()):
            return "beta must be finite and >= 0 everywhere, got a negative or non-finite entry"
        return None
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 <= beta < float("inf")):
        return f"beta must be a finite number >= 0 or a tensor, got {beta!r}"
    return None


def _tail_parts(student_logits, teacher_logits, top_k, temperature, tp_group, beta_error=None,
                donate_teacher=False, shard: Optional[VocabShard] = None) -> Tuple[TailParts, TopOne]:
    error = _check_logits(student_logits, teacher_logits, top_k, temperature) or beta_error
    if shard is not None:  # resolved once by the caller: local checks only, no collective, no host sync
        if error is None and student_logits.shape[-1] != shard.size:
            error = f"the logits' last dim {student_logits.shape[-1]} is not this rank's vocabulary slice {shard}"
        if error is not None:
            raise ValueError(f"tail_divergence: {error}")
    else:
        # The exchange runs on the logits' device even where one argument is bad (a CPU tensor
        # would fail in NCCL on this rank while the others wait in the collective).
        devices = [x.device for x in (student_logits, teacher_logits) if isinstance(x, torch.Tensor)]
        device = next((d for d in devices if d.type != "cpu"), devices[0] if devices else None)
        # A rank with bad input still joins the check, with placeholder values, so that every rank raises.
        valid = error is None
        shard = resolve_vocab_shard(student_logits.shape[-1] if valid else 0,
                                    tp_group,
                                    caller="tail_divergence",
                                    device=device,
                                    local_error=error,
                                    must_agree={
                                        "top_k": top_k if valid else 0,
                                        "temperature": temperature if valid else 0,
                                        "the number of tokens": student_logits.shape[:-1].numel() if valid else 0,
                                    })
    *parts, student_top1, teacher_top1 = _TailDivergenceParts.apply(student_logits, teacher_logits.detach(), top_k,
                                                                    float(temperature), tp_group, shard,
                                                                    donate_teacher)
    token_shape = student_logits.shape[:-1]
    top1 = TopOne(student_top1.view(token_shape), teacher_top1.view(token_shape) if teacher_top1 is not None else None)
    return TailParts(*(part.view(token_shape) for part in parts)), top1


def tail_divergence_parts(student_logits: torch.Tensor,
                          teacher_logits: torch.Tensor,
                          *,
                          top_k: int,
                          temperature: float = 1.0,
                          tp_group=None,
                          donate_teacher: bool = False,
                          return_top1: bool = False,
                          shard: Optional[VocabShard] = None) -> Union[TailParts, Tuple[TailParts, TopOne]]:
    """The per-token parts of the tail-aware divergence from one pass (see :class:`TailParts`).

    Same arguments and contract as :func:`tail_divergence`, without β:
    ``D = head_kl + β · tail_kl`` (:meth:`TailParts.divergence`). ``return_top1``: also each model's global argmax
    (:class:`TopOne`), taken in the same pass and exchanged in the same all-gather, so that a
    caller reporting top-1 agreement reads neither model's logits again.

    ``shard``: this rank's vocabulary slice, resolved once by a caller whose inputs agree across
    ranks by construction (the training job, from its engines). The call then skips the
    collective argument/layout check and its host sync (one all-gather instead of two) and checks
    its own arguments only: a bad one raises on this rank alone. None (the default): the check runs.
    """
    parts, top1 = _tail_parts(student_logits, teacher_logits, top_k, temperature, tp_group,
                              donate_teacher=donate_teacher, shard=shard)
    return (parts, top1) if return_top1 else parts


def tail_divergence(student_logits: torch.Tensor,
                    teacher_logits: torch.Tensor,
                    *,
                    top_k: int,
                    beta: Union[float, torch.Tensor],
                    temperature: float = 1.0,
                    tp_group=None,
                    donate_teacher: bool = False) -> torch.Tensor:
    """Per-token tail-aware divergence ``D = KL(p̂‖q̂) + β·KL(p̃‖q̃)`` (DESIGN.md §1).

    Args:
        student_logits, teacher_logits: ``[..., V]``, or this rank's ``[..., V_local]`` slice of
            both when ``tp_group`` is given (identical slices; fp32, bf16 or fp16; math in fp32).
        top_k: K ≥ 0. ``0`` gives β·KL; ``K ≥ V`` gives KL. Ties at the K-th teacher value go to
            the lower global token id, for any tensor-parallel size.
        beta: tail weight, a number or a tensor broadcastable to the per-token shape, ≥ 0.
            ``beta = teacher tail mass`` gives the plain forward KL. Treated as a constant.
        temperature: τ > 0; both logits are divided by it. No τ² factor is applied here.
        tp_group: ``None`` for the whole vocabulary, else the tensor-parallel process group whose
            rank r holds the r-th contiguous vocabulary slice (slices may be uneven).
        donate_teacher: the caller will not read ``teacher_logits`` after backward, so backward
            writes the student's gradient into the teacher's storage instead of a new
            ``[..., V_local]`` buffer (where both have the same dtype and are contiguous; otherwise
            ignored). Saves one logits-sized tensor per training step; the teacher's values are
            gone once backward has run.

    Returns:
        float32 ``[...]`` (the logits' shape without the last dim), identical on every rank of the
        group; no reduction. Only ``student_logits`` gets a gradient (closed form, computed in row
        chunks in backward with zero collectives); the teacher is detached.

    Raises:
        ValueError on every rank of the group, naming the argument, when any rank's input is bad
        (shapes, dtypes, top_k, beta, temperature, token counts or K/τ differing across ranks).
    """
    token_shape = student_logits.shape[:-1] if isinstance(student_logits, torch.Tensor) else None
    parts, _ = _tail_parts(student_logits, teacher_logits, top_k, temperature, tp_group,
                           _check_beta(beta, token_shape) if token_shape is not None else None,
                           donate_teacher=donate_teacher)
    if isinstance(beta, torch.Tensor):
        beta = beta.detach().to(device=parts.tail_kl.device, dtype=torch.float32)
    return parts.divergence(beta)

