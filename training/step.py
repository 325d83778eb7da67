"""One distillation step on vocabulary-sharded logits, and evaluation with the same objective.

Per micro-batch: the frozen teacher's forward under ``no_grad``, the student's forward, the
objective on the valid next-token positions only (labels != -100, shifted by one), then backward.
The loss is a mean over the valid tokens of the *global* batch (all micro-batches, all data-parallel
ranks), so it does not depend on how the batch is split.

Two paths compute the same micro-batch: the unfused one (the reference) takes each model's logit
slices ``[n, V_local]`` and the objective on them; with ``engines.fused`` (``loss.fused_head``) both
models are called through their fused heads (``training.fused_head``): the student's head returns
the summed objective itself (``loss.fused``), and evaluation takes its metrics chunk by chunk, so
no ``[n, V_local]`` logits outlive a chunk.

Device discipline (DESIGN.md §6): each batch is moved once onto the engine's device; every tensor
made here lives there; sums stay on the device. The global token count is all-reduced while the
first micro-batch's forwards run. The step adds no host sync of its own: whether the optimizer step
was applied is DeepSpeed's decision (read on the host from its all-reduced gradient norm), and only
a skipped step gathers which ranks' logits went bad; :func:`step_means` (logging steps only) reads
the logged values.
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from core.tokens import IGNORE_INDEX
from data.loader import to_device
from loss.fused import fused_objective, logit_chunks, non_finite
from loss.metrics import EvalResult, EvalSums, objective_metrics
from loss.objective import OUTPUTS, distillation_objective
from model_parallel import all_reduce_sum, gather_rows, global_argmax, start_all_reduce_sum
from training.models import takes_logits_to_keep

# Summed per token, reported as means over the valid tokens of the step.
_LOGGED = OUTPUTS + ("top1_agreement",)


@dataclass
class Positions:
    """Which positions of a micro-batch get logits, decided on the host from its labels (no sync).

    ``keep`` ``[k]``: the positions with a next-token target in some row (the last position never
    has one); the heads run on these only (``logits_to_keep``). ``select`` ``[n]``: which rows of
    the ``[B·k, V_local]`` logits have a target (row-major over ``[B, k]``), or None when all do
    (pre-training blocks): the logits are then used as a ``[B·k, V_local]`` view, with no copy and no
    scatter in backward. ``targets`` and ``rows`` ``[n]``: each selected position's target id and
    batch row. Computed from the host batch's labels before it moves, then moved with it
    (:meth:`to`), so that selecting on the device needs no data-dependent shape (no host sync).

    On-policy micro-batches (:mod:`training.on_policy`) also carry ``weights`` ``[n]`` (on the
    device: 0 after a continuation's first EOS, which only the device knows), and ``rows`` that put
    each weightless token in a sequence of its own (``num_sequences`` of them), so that
    ``beta_mode: sequence``'s per-sequence means see only the counted tokens.
    """

    keep: torch.Tensor
    select: Optional[torch.Tensor]
    targets: torch.Tensor
    rows: torch.Tensor
    tokens: int
    """Valid next-token positions of the micro-batch (an upper bound where ``weights`` is set)."""
    weights: Optional[torch.Tensor] = None
    """``[n]`` float32 on the device: each token's weight in the loss and in every logged sum; None: all 1."""
    num_sequences: Optional[int] = None
    """Sequence ids in ``rows`` lie below this; None: the batch's row count."""

    def to(self, device) -> "Positions":
        names = ("keep", "select", "targets", "rows", "weights")
        moved = to_device({name: getattr(self, name) for name in names if getattr(self, name) is not None}, device)
        return Positions(keep=moved["keep"], select=moved.get("select"), targets=moved["targets"], rows=moved["rows"],
                         tokens=self.tokens, weights=moved.get("weights"), num_sequences=self.num_sequences)

    def weighted(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[n]`` times the token weights (unchanged without weights)."""
        return values if self.weights is None else values * self.weights


@dataclass
class MicroBatch:
    """One micro-batch on the device: the ids the models read and where the loss is taken."""

    input_ids: torch.Tensor
    """``[B, L]`` right-padded rows, on the engine's device."""
    positions: Positions
    """On the same device."""


def positions_from_labels(labels: torch.Tensor, padding: Optional[torch.Tensor] = None) -> Positions:
    """:class:`Positions` of host ``labels`` ``[B, S]`` (unshifted: position i's label is token i);
    ``padding``: the batch's attention mask, checked to be right padding."""
    if padding is not None and not bool((padding.cummin(dim=1).values == padding).all()):  # host
        raise ValueError("a batch is padded on the left: the step calls the models without a padding mask, "
                         "which is exact only for right-padded rows (data.loader.Collator)")
    labels = labels[:, 1:]  # (B, S-1), host: nothing here waits for a device
    has_target = labels != IGNORE_INDEX
    keep = has_target.any(dim=0).nonzero()[:, 0]  # (k,)
    valid = has_target[:, keep]  # (B, k)
    select = None if bool(valid.all()) else valid.reshape(-1).nonzero()[:, 0]
    return Positions(keep=keep, select=select, targets=labels[:, keep][valid], rows=valid.nonzero()[:, 0],
                     tokens=int(has_target.sum()))


def mask_vocab_padding(logits: torch.Tensor, vocab_start: int, real_vocab_size: int) -> torch.Tensor:
    """Padded vocabulary rows carry no probability: their logit columns become -inf (in place).

    Written through ``.data``, invisible to autograd: the losses give -inf columns a zero gradient
    anyway. A write autograd sees, even under ``no_grad``, bumps the version of a view of the head's
    output, and backward then rebuilds that view's gradient through ``as_strided`` (one more
    ``[n, V_local]`` zero-filled buffer). Safe because no op saved the head's output for its backward."""
    first_pad = real_vocab_size - vocab_start
    if first_pad < logits.shape[-1]:
        logits.data[..., max(first_pad, 0):] = float("-inf")
    return logits


def _causal_mask(batch) -> torch.Tensor:
    """The 2D attention mask the models get: all ones, ``[B, S]`` bool on the batch's device.

    Rows are right-padded (:class:`data.loader.Collator`), so under causal attention no real
    position ever attends to a pad: every real position's logits are exact without the padding
    mask (pads' own logits are never used). Given any explicit mask, transformers does not inspect
    the position ids for packed sequences (one host sync per forward); given the padding, sdpa would
    materialise a ``[B, 1, S, S]`` mask (two host syncs to decide so) instead of its causal kernel,
    which an all-ones mask keeps (one host sync, transformers' own; eager: none). Packed SFT rows are
    one sequence to the models, as they always were (no position ids are passed)."""
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def _logits(model, batch, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, k, V_local]`` logits at positions ``keep`` (``[k]``, on the device): the model applies its
    head (and Gemma-2's final soft-capping) to those hidden states only. A model whose forward has
    no ``logits_to_keep`` (older or remote code) computes every position, then ``keep`` is copied out.
    ``mask``: :func:`_causal_mask`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "use_cache": False}
    if takes_logits_to_keep(getattr(model, "module", model)):  # a DeepSpeed engine wraps the model
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, keep]


def _select(logits: torch.Tensor, select) -> torch.Tensor:
    """``[n, V_local]`` from ``[B, k, V_local]``: a free view when every kept position is valid, else
    the rows ``select`` names (a copy; indices from the host, so the size is known without a sync)."""
    flat = logits.view(-1, logits.shape[-1])
    return flat if select is None else flat.index_select(0, select)


def _positions(host_batch) -> Positions:
    return positions_from_labels(host_batch["labels"], host_batch.get("attention_mask"))


def _slices(engines, batch, positions: Positions):
    """(student, teacher, targets, rows) on the valid next-token positions: logit slices ``[n, V_local]``
    with padded vocabulary columns at -inf, the target ids ``[n]`` and each position's row ``[n]``.
    ``positions`` is on the device already (moved with the batch).

    Memory: each model's logits exist once, ``[B, k, V_local]``; the teacher's are dropped by the
    caller as soon as the loss has them."""
    teacher, mask = None, _causal_mask(batch)
    if engines.teacher is not None:
        with torch.no_grad():
            teacher = mask_vocab_padding(
                _select(_logits(engines.teacher, batch, positions.keep, mask), positions.select),
                engines.vocab_start, engines.real_vocab_size)
    student = mask_vocab_padding(_select(_logits(engines.student, batch, positions.keep, mask), positions.select),
                                 engines.vocab_start, engines.real_vocab_size)
    return student, teacher, positions.targets, positions.rows


def _objective(engines, loss_cfg, student, teacher, targets, rows, num_rows, donate_teacher=False):
    out = distillation_objective(student, teacher, targets, kind=loss_cfg.kind, top_k=loss_cfg.top_k,
                                 beta=loss_cfg.beta, beta_mode=loss_cfg.beta_mode,
                                 temperature=loss_cfg.temperature, ce_weight=loss_cfg.ce_weight,
                                 sequence_ids=rows, num_sequences=num_rows, tp_group=engines.tp_group,
                                 shard=engines.vocab_shard, donate_teacher=donate_teacher)
    if teacher is not None:
        # The tail divergence hands back both argmaxes from its own pass; other kinds need one more.
        with torch.no_grad():
            for name, logits in (("student_top1", student), ("teacher_top1", teacher)):
                if name not in out:
                    out[name] = global_argmax(logits.detach(), engines.vocab_start, engines.tp_group)
        out["top1_agreement"] = (out["student_top1"] == out["teacher_top1"]).float()
    return out


def _num_sequences(batch, where: Positions) -> int:
    return where.num_sequences or batch["input_ids"].shape[0]


def _unfused_micro_batch(engines, loss_cfg, batch, where: Positions):
    """``(loss, out, bad)`` of one micro-batch on whole logit slices (the reference path): the summed
    loss to back-propagate, the per-token outputs, and whether this rank's own logits went bad."""
    slices = _slices(engines, batch, where)
    # Which rank's own logits went bad: the loss itself is non-finite on every rank of the
    # tensor-parallel group once the statistics are exchanged.
    bad = non_finite(*slices[:2])
    # The teacher's logits are not read after backward, which may take their storage; the student's
    # live on in the graph until backward only.
    out = _objective(engines, loss_cfg, *slices, num_rows=_num_sequences(batch, where), donate_teacher=True)
    return where.weighted(out["loss"]).sum(), out, bad


def _fused_call(engines, loss_cfg, where: Positions, num_rows: int, student_rows, student, teacher_rows, teacher):
    """:data:`training.fused_head.Compute` for one micro-batch: the objective on the heads' valid rows."""
    total, out = fused_objective(student_rows, student, teacher_rows, teacher, where.targets, kind=loss_cfg.kind,
                                 top_k=loss_cfg.top_k, beta=loss_cfg.beta, beta_mode=loss_cfg.beta_mode,
                                 temperature=loss_cfg.temperature, ce_weight=loss_cfg.ce_weight,
                                 sequence_ids=where.rows, num_sequences=num_rows, tp_group=engines.tp_group,
                                 shard=engines.vocab_shard, real_vocab_size=engines.real_vocab_size,
                                 token_weights=where.weights)
    if teacher is not None:
        out["top1_agreement"] = (out["student_top1"] == out["teacher_top1"]).float()
    return total, out


def _through_fused_heads(engines, batch, where: Positions, compute):
    """Both models called through their fused heads (``engines.fused``); returns the request, whose
    ``total`` is the student engine's output (checked), and whose ``out`` is ``compute``'s."""
    mask = _causal_mask(batch)
    with engines.fused.request(where.select, compute) as request:
        if engines.teacher is not None:
            with torch.no_grad():
                _logits(engines.teacher, batch, where.keep, mask)  # the head keeps its input rows
        request.total = engines.fused.served(_logits(engines.student, batch, where.keep, mask), request)
    return request


def _fused_micro_batch(engines, loss_cfg, batch, where: Positions):
    """:func:`_unfused_micro_batch`'s ``(loss, out, bad)`` with the output layers inside the loss: no
    logits outlive a chunk. ``loss`` is the student engine's own output, so back-propagating it runs
    DeepSpeed's output hooks as for the unfused loss."""
    compute = functools.partial(_fused_call, engines, loss_cfg, where, _num_sequences(batch, where))
    request = _through_fused_heads(engines, batch, where, compute)
    out = request.out
    return request.total, out, out.pop("bad")


def _known_metrics(loss_cfg, out) -> dict:
    """The evaluation metrics the objective already computed (``out``, :func:`_objective`'s), with
    the metric's constant β (:func:`loss.metrics.objective_metrics`)."""
    return objective_metrics(out, kind=loss_cfg.kind, beta=loss_cfg.beta, temperature=loss_cfg.temperature)


@dataclass
class StepResult:
    """What :func:`train_step` leaves for the job: device tensors, read only on logging steps."""

    sums: Dict[str, torch.Tensor]
    """Per-token sums over this rank's valid tokens (0-dim float64, on the device)."""
    tokens: torch.Tensor
    """Valid tokens of the global batch (0-dim float64, on the device; all-reduced)."""
    skipped: bool
    """The optimizer step was not applied (non-finite gradients or loss), agreed on every rank."""
    non_finite_ranks: List[int]
    """Ranks whose own teacher or student logits held NaN or +inf at this step."""


def data_micro_batches(micro_batches, device) -> List[MicroBatch]:
    """Host batches (:class:`data.loader.Collator`'s) as :class:`MicroBatch` es on ``device``: the
    positions are taken from the labels on the host, then the ids and positions move once."""
    positions = [_positions(batch) for batch in micro_batches]  # on the host, before the batches move
    # The ids and what the positions took from the labels are all the device needs of a batch.
    return [MicroBatch(input_ids=to_device({"input_ids": batch["input_ids"]}, device)["input_ids"],
                       positions=where.to(device)) for batch, where in zip(micro_batches, positions)]


def _token_count(micro_batches: List[MicroBatch], device) -> torch.Tensor:
    """The step's counted tokens on this rank, 0-dim float64 on ``device``: the host-known counts
    as one tensor, plus on-policy micro-batches' weights summed on the device (no host sync)."""
    tokens = torch.tensor(float(sum(mb.positions.tokens for mb in micro_batches if mb.positions.weights is None)),
                          dtype=torch.float64, device=device)
    for mb in micro_batches:
        if mb.positions.weights is not None:
            tokens += mb.positions.weights.sum(dtype=torch.float64)
    return tokens


def train_step(engines, loss_cfg, micro_batches) -> StepResult:
    """Run ``grad_accum`` micro-batches and the optimizer step. ``micro_batches``: host batches (the
    data's, moved here) or :class:`MicroBatch` es already on the device (:mod:`training.on_policy`'s)."""
    student, device = engines.student, engines.device
    if micro_batches and not isinstance(micro_batches[0], MicroBatch):
        micro_batches = data_micro_batches(micro_batches, device)
    tokens = _token_count(micro_batches, device)
    counted = start_all_reduce_sum(tokens, engines.dp_group)  # overlaps with the first forwards
    scale, names, packed = None, (), None
    bad = torch.zeros((), dtype=torch.bool, device=device)
    micro_batch = _unfused_micro_batch if engines.fused is None else _fused_micro_batch
    for mb in micro_batches:
        batch, where = {"input_ids": mb.input_ids}, mb.positions
        loss, out, micro_bad = micro_batch(engines, loss_cfg, batch, where)
        bad |= micro_bad
        if scale is None:
            counted.wait()
            # DeepSpeed averages gradients over data-parallel ranks; the loss is a global-token mean.
            scale = (engines.dp_size / tokens.clamp(min=1.0)).float()
        student.backward(loss * scale, scale_wrt_gas=False)
        del loss  # its graph, before the optimizer's temporaries and the next micro-batch's forwards
        # ZeRO-3 skips the optimizer (and scheduler) step when the global gradient norm is not
        # finite; every rank takes the same decision from the same all-reduced norm.
        student.step()
        # One stack and one add per micro-batch for every logged sum (fp64 accumulation).
        names = tuple(name for name in _LOGGED if name in out)
        totals = torch.stack([where.weighted(out[name].detach().float()) for name in names]).sum(dim=1,
                                                                                                dtype=torch.float64)
        packed = totals if packed is None else packed + totals
        del out
    sums = dict(zip(names, packed.unbind())) if packed is not None else {}
    skipped = not student.was_step_applied()  # the same on every rank: from the all-reduced gradient norm
    non_finite_ranks = []
    if skipped:  # which ranks' logits went bad, only where a step was skipped
        flags = gather_rows(bad.view(1, 1).float(), dist.group.WORLD)[0, :, 0]  # (world,)
        flags = flags.tolist()  # host sync: one flag per rank, on skipped steps only
        non_finite_ranks = [rank for rank, flag in enumerate(flags) if flag]
    return StepResult(sums=sums, tokens=tokens, skipped=skipped, non_finite_ranks=non_finite_ranks)


def step_means(result: StepResult, engines) -> dict:
    """Collective over the data-parallel group, on logging steps only: the step's means, its token
    count, the gradient norm and the learning rate, as Python numbers."""
    names = sorted(result.sums)
    packed = all_reduce_sum(torch.stack([result.sums[name] for name in names]), engines.dp_group)
    *values, tokens = torch.cat([packed, result.tokens.view(1)]).tolist()  # host sync: the logged values
    means = {name: value / max(tokens, 1.0) for name, value in zip(names, values)}
    norm = engines.student.get_global_grad_norm()
    means["grad_norm"] = float(norm) if norm is not None else 0.0  # host sync (a device tensor under ZeRO-3)
    means["lr"] = engines.student.get_lr()[0]
    means["tokens"] = tokens
    return means


def _fused_eval_call(engines, loss_cfg, sums: EvalSums, where: Positions, num_rows: int, student_rows, student,
                     teacher_rows, teacher):
    """:data:`training.fused_head.Compute` for evaluation: the objective on the whole micro-batch (its
    ``beta_mode: sequence`` needs every token), then the metrics chunk by chunk on the logits the
    fused head makes, so no ``[n, V_local]`` logits outlive a chunk."""
    total, out = _fused_call(engines, loss_cfg, where, num_rows, student_rows, student, teacher_rows, teacher)
    known = _known_metrics(loss_cfg, out)
    for rows, student_logits, teacher_logits in logit_chunks(student_rows, student, teacher_rows, teacher,
                                                             shard=engines.vocab_shard, tp_group=engines.tp_group,
                                                             real_vocab_size=engines.real_vocab_size):
        sums.add(student_logits, teacher_logits, where.targets[rows],
                 known={name: value[rows] for name, value in known.items()}, sequence_ids=where.rows[rows])
    return total, out


def _eval_batch(engines, loss_cfg, sums: EvalSums, batch, where: Positions) -> Dict[str, torch.Tensor]:
    """Adds one batch's metrics to ``sums``; returns the objective's per-token outputs."""
    num_rows = batch["input_ids"].shape[0]
    if engines.fused is not None:
        compute = functools.partial(_fused_eval_call, engines, loss_cfg, sums, where, num_rows)
        return _through_fused_heads(engines, batch, where, compute).out
    student, teacher, targets, rows = _slices(engines, batch, where)
    out = _objective(engines, loss_cfg, student, teacher, targets, rows, num_rows=num_rows)
    sums.add(student, teacher, targets, known=_known_metrics(loss_cfg, out), sequence_ids=rows)
    return out


@torch.no_grad()
def evaluate(engines, loss_cfg, batches, n_bins: int = 10, bands=None) -> EvalResult:
    """``(scalars, bins)`` over the valid tokens of ``batches`` (this rank's share, reduced over data
    parallel): the objective as ``loss`` plus :class:`loss.metrics.EvalSums`' metrics, and the
    calibration bins for reliability diagrams. Sums stay on the device until the end. With the
    fused head (``engines.fused``) the metrics are taken chunk by chunk: no whole logits either.
    ``bands``: :attr:`loss.metrics.TokenBands.band`, for the tail metrics (each batch row a sequence)."""
    engines.student.eval()
    sums = EvalSums(top_k=loss_cfg.top_k, beta=loss_cfg.beta, n_bins=n_bins, tp_group=engines.tp_group,
                    device=engines.device, shard=engines.vocab_shard, bands=bands)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engines.device)
    for batch in batches:
        where = _positions(batch).to(engines.device)
        batch = to_device({"input_ids": batch["input_ids"]}, engines.device)
        sums.start_batch(batch["input_ids"].shape[0])
        loss_sum += _eval_batch(engines, loss_cfg, sums, batch, where)["loss"].double().sum()
    engines.student.train()
    sums.add_sum("loss", loss_sum)
    return sums.reduce(engines.dp_group)
