"""One distillation step on vocabulary-sharded logits, and evaluation with the same objective.

Per micro-batch: the frozen teacher's forward under ``no_grad``, the student's forward, the
objective on the valid next-token positions only (labels != -100, shifted by one), then backward.
The loss is a mean over the valid tokens of the *global* batch (all micro-batches, all data-parallel
ranks), so it does not depend on how the batch is split.
"""

import os
from collections import defaultdict

import torch
import torch.distributed as dist

from loss.objective import distillation_objective
from eval.metrics import EvalSums
from model_parallel import global_argmax

IGNORE_INDEX = -100
# Summed per token, reported as means over the valid tokens of the step.
_LOGGED = ("loss", "kd", "ce", "head_kl", "tail_kl", "teacher_tail_mass", "student_tail_mass")


def _valid_positions(batch):
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE_INDEX


def _mask_padding(logits: torch.Tensor, vocab_start: int, real_vocab_size: int) -> torch.Tensor:
    """Padded vocabulary rows carry no probability: their logit columns become -inf (in place)."""
    first_pad = real_vocab_size - vocab_start
    if first_pad < logits.shape[-1]:
        logits[..., max(first_pad, 0):] = float("-inf")
    return logits


def _slices(engines, batch, student_logits):
    """(student, teacher, targets, rows) on the valid next-token positions: logit slices ``[n, V_local]``
    with padded vocabulary columns at -inf, the target ids ``[n]`` and each position's row ``[n]``."""
    targets, valid = _valid_positions(batch)
    teacher = None
    if engines.teacher is not None:
        with torch.no_grad():
            teacher = engines.teacher(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
        _mask_padding(teacher, engines.vocab_start, engines.real_vocab_size)
        _inject_nan_for_tests(teacher, engines.student.global_steps + 1)
    student = _mask_padding(student_logits[:, :-1][valid], engines.vocab_start, engines.real_vocab_size)
    return student, teacher, targets[valid], valid.nonzero()[:, 0]


def _inject_nan_for_tests(teacher_logits, step: int) -> None:
    """``DISTILL_TEST_NAN_TEACHER=RANK:STEP`` poisons that rank's teacher logits at that step."""
    spec = os.environ.get("DISTILL_TEST_NAN_TEACHER")
    if spec and [int(x) for x in spec.split(":")] == [dist.get_rank(), step]:
        teacher_logits.fill_(float("nan"))


def _objective(engines, loss_cfg, student, teacher, targets, rows):
    out = distillation_objective(student, teacher, targets, kind=loss_cfg.kind, top_k=loss_cfg.top_k,
                                 beta=loss_cfg.beta, beta_mode=loss_cfg.beta_mode,
                                 temperature=loss_cfg.temperature, ce_weight=loss_cfg.ce_weight,
                                 sequence_ids=rows, tp_group=engines.tp_group)
    if teacher is not None:
        with torch.no_grad():
            agree = global_argmax(student.detach(), engines.vocab_start, engines.tp_group) == global_argmax(
                teacher, engines.vocab_start, engines.tp_group)
        out["top1_agreement"] = agree.float()
    return out


def _global_sum(value: float, group) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return tensor.item()


def _reduce_means(sums: dict, tokens: float, group) -> dict:
    names = sorted(sums)
    tensor = torch.tensor([sums[name] for name in names], dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return {name: value / max(tokens, 1.0) for name, value in zip(names, tensor.tolist())}


def train_step(engines, loss_cfg, micro_batches) -> dict:
    """Run ``grad_accum`` micro-batches and the optimizer step; return the step's means."""
    student = engines.student
    local_tokens = sum(int(_valid_positions(batch)[1].sum()) for batch in micro_batches)
    tokens = _global_sum(local_tokens, engines.dp_group)
    # DeepSpeed averages gradients over data-parallel ranks; the loss is a global-token mean.
    scale = engines.dp_size / max(tokens, 1.0)
    sums = defaultdict(float)
    finite = True
    for batch in micro_batches:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        slices = _slices(engines, batch, logits)
        # Which rank's own logits went bad (NaN or +inf; -inf is padding): the loss itself is
        # non-finite on every rank of the tensor-parallel group once the statistics are exchanged.
        finite = finite and not any(bool(torch.isnan(x).any() or torch.isposinf(x).any())
                                    for x in slices[:2] if x is not None)
        out = _objective(engines, loss_cfg, *slices)
        loss = out["loss"].sum()
        student.backward(loss * scale, scale_wrt_gas=False)
        # ZeRO-3 skips the optimizer (and scheduler) step when the global gradient norm is not
        # finite; every rank takes the same decision from the same all-reduced norm.
        student.step()
        for name in _LOGGED + ("top1_agreement",):
            if name in out:
                sums[name] += float(out[name].detach().float().sum())
        del logits, out
    means = _reduce_means(sums, tokens, engines.dp_group)
    means["tokens"] = tokens
    means["skipped"] = not student.was_step_applied()
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, finite)
    means["non_finite_ranks"] = [rank for rank, ok in enumerate(flags) if not ok]
    means["grad_norm"] = float(student.get_global_grad_norm() or 0.0)
    means["lr"] = student.get_lr()[0]
    return means


@torch.no_grad()
def evaluate(engines, loss_cfg, batches, n_bins: int = 10):
    """``(scalars, bins)`` over the valid tokens of ``batches`` (this rank's share, reduced over data
    parallel): the objective as ``loss`` plus :class:`eval.metrics.EvalSums`' metrics, and the
    calibration bins for reliability diagrams."""
    engines.student.eval()
    sums = EvalSums(top_k=loss_cfg.top_k, beta=loss_cfg.beta, n_bins=n_bins, tp_group=engines.tp_group)
    loss_sum = 0.0
    for batch in batches:
        logits = engines.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student, teacher, targets, rows = _slices(engines, batch, logits)
        loss_sum += float(_objective(engines, loss_cfg, student, teacher, targets, rows)["loss"].double().sum())
        sums.add(student, teacher, targets)
        del logits, student, teacher
    engines.student.train()
    scalars = sums.result(engines.dp_group)
    scalars["loss"] = _global_sum(loss_sum, engines.dp_group) / max(scalars["tokens"], 1.0)
    return scalars, sums.last_bins
