"""loss.fused: the output layers fused with the objective equal the unfused path (the reference:
the head's logits, then ``distillation_objective``, then autograd), on 1, 2 and 3 ranks."""

import itertools

import pytest
import torch
import torch.distributed as dist

import loss.fused as fused
from loss import cross_entropy
from loss.fused import OutputLayer, exchanged_cross_entropy, fused_objective, logit_chunks
from loss.objective import distillation_objective
from model_parallel import VocabShard, global_argmax
from model_parallel.spawn import run_on_ranks
from model_parallel.testing.comm_counter import count_collective_bytes

VOCAB, REAL, HIDDEN, TEACHER_HIDDEN, TOKENS, ROWS = 23, 21, 6, 8, 14, 3
# Uneven slices smaller than K = 7, summing to VOCAB; the last one holds the two padded columns.
SLICES = {1: [23], 2: [18, 5], 3: [5, 3, 15]}


def _inputs(softcap=None, bias=True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    teacher_hidden = torch.randn(TOKENS, TEACHER_HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g)
    teacher_weight = torch.randn(VOCAB, TEACHER_HIDDEN, generator=g) * 1.5
    teacher_weight[:4] = teacher_weight[4]  # ties in the teacher's top-K across ids
    b = torch.randn(VOCAB, generator=g) if bias else None
    targets = torch.randint(0, REAL, (TOKENS,), generator=g)
    rows = torch.tensor([0] * 5 + [1] * 6 + [2] * 3)  # three sequences (SFT-like rows)
    return dict(hidden=hidden, teacher_hidden=teacher_hidden, weight=weight, teacher_weight=teacher_weight, bias=b,
                targets=targets, rows=rows, softcap=softcap)


def _head(hidden, weight, bias, softcap):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _reference(x, settings):
    """The unfused path on the whole vocabulary: logits with padding at -inf, the objective, autograd."""
    hidden = x["hidden"].clone().requires_grad_(True)
    weight = x["weight"].clone().requires_grad_(True)
    bias = None if x["bias"] is None else x["bias"].clone().requires_grad_(True)
    student = _head(hidden, weight, bias, x["softcap"])
    student.data[:, REAL:] = float("-inf")  # as training.step.mask_vocab_padding: invisible to autograd
    teacher = None
    if settings["kind"] != "ce":
        teacher = _head(x["teacher_hidden"], x["teacher_weight"], None, x["softcap"])
        teacher[:, REAL:] = float("-inf")
    out = distillation_objective(student, teacher, x["targets"], sequence_ids=x["rows"], num_sequences=ROWS,
                                 **settings)
    out["loss"].sum().backward()
    if teacher is not None:
        out.setdefault("student_top1", global_argmax(student.detach(), 0, None))
        out.setdefault("teacher_top1", global_argmax(teacher, 0, None))
    grads = (hidden.grad, weight.grad, None if bias is None else bias.grad)
    return {name: value.detach() for name, value in out.items()}, grads


def _fused(x, settings, start=0, size=VOCAB, tp_group=None):
    hidden = x["hidden"].clone().requires_grad_(True)
    weight = x["weight"][start:start + size].clone().requires_grad_(True)
    bias = None if x["bias"] is None else x["bias"][start:start + size].clone().requires_grad_(True)
    teacher = None
    if settings["kind"] != "ce":
        teacher = OutputLayer(x["teacher_weight"][start:start + size], softcap=x["softcap"])
    total, out = fused_objective(hidden, OutputLayer(weight, bias, x["softcap"]),
                                 None if teacher is None else x["teacher_hidden"], teacher, x["targets"],
                                 sequence_ids=x["rows"], num_sequences=ROWS, tp_group=tp_group,
                                 shard=VocabShard(start, size, VOCAB), real_vocab_size=REAL, **settings)
    with count_collective_bytes() as backward:
        total.backward()
    result = total.detach(), out, (hidden.grad, weight.grad, None if bias is None else bias.grad)
    return result + (backward.calls,) if tp_group is not None else result


SETTINGS = [
    dict(kind="tail", top_k=7, beta=2.0, temperature=1.0),
    dict(kind="tail", top_k=0, beta=0.5, temperature=2.0),
    dict(kind="tail", top_k=VOCAB, beta=1.0, temperature=1.0),
    dict(kind="tail", top_k=3, beta=1.5, beta_mode="sequence", temperature=2.0),
    dict(kind="tail", top_k=7, beta=1.0, temperature=1.0, ce_weight=0.3),
    # β and β mode are ignored (β = 0): no teacher-only pass for the sequence mode.
    dict(kind="topk_bucket", top_k=7, beta=2.0, beta_mode="sequence", temperature=2.0),
    dict(kind="kl", top_k=7, beta=1.0, temperature=2.0),
    dict(kind="reverse_kl", top_k=7, beta=1.0, temperature=1.0, ce_weight=0.5),
    dict(kind="ce", top_k=7, beta=1.0),
]


def _close(actual, expected, what, tolerance=1e-5):
    scale = expected.abs().max().clamp(min=1.0)
    error = (actual - expected).abs().max() / scale
    assert error <= tolerance, f"{what}: max relative error {error:.2e}"


def _check(fused_result, reference, start=0, size=VOCAB):
    total, out, (grad_hidden, grad_weight, grad_bias) = fused_result
    expected, (ref_hidden, ref_weight, ref_bias) = reference
    _close(total, expected["loss"].sum(), "total")
    for name, value in expected.items():
        if name.endswith("top1"):
            assert torch.equal(out[name], value), name
        else:
            _close(out[name], value, name)
    _close(grad_hidden, ref_hidden, "hidden gradient")
    _close(grad_weight, ref_weight[start:start + size], "weight gradient")
    if ref_bias is not None:
        _close(grad_bias, ref_bias[start:start + size], "bias gradient")
    assert not bool(out["bad"])


@pytest.mark.parametrize("settings, softcap, numel",
                         [(s, c, n) for s, c, n in itertools.product(SETTINGS, (None, 4.0), (1, 3 * VOCAB, 1 << 19))])
def test_one_process_equals_the_unfused_path(monkeypatch, settings, softcap, numel):
    monkeypatch.setattr(fused, "CPU_CHUNK_NUMEL", numel)  # 1 row, 3 rows, all rows per chunk
    x = _inputs(softcap=softcap)
    _check(_fused(x, settings), _reference(x, settings))


def test_no_tokens_and_no_grad():
    x = _inputs()
    x.update(hidden=x["hidden"][:0], teacher_hidden=x["teacher_hidden"][:0], targets=x["targets"][:0],
             rows=x["rows"][:0])
    total, out, grads = _fused(x, SETTINGS[0])
    assert total.item() == 0.0 and out["loss"].shape == (0,) and grads[0].shape == (0, HIDDEN)
    assert grads[1].abs().max() == 0
    with torch.no_grad():
        x = _inputs()
        total, out = fused_objective(x["hidden"], OutputLayer(x["weight"]), x["teacher_hidden"],
                                     OutputLayer(x["teacher_weight"]), x["targets"], kind="kl", top_k=0, beta=1.0,
                                     shard=VocabShard(0, VOCAB, VOCAB))
    assert total.grad_fn is None and out["kd"].shape == (TOKENS,)


def test_non_finite_logits_are_flagged():
    x = _inputs()
    x["hidden"][3, 0] = float("nan")
    _, out, _ = _fused(x, SETTINGS[0])
    assert bool(out["bad"])


def test_exchanged_cross_entropy_equals_deepspeeds():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, VOCAB, generator=g) * 4).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (9,), generator=g)
    targets[2] = -100
    ours = exchanged_cross_entropy(logits, targets, tp_group=None, shard=VocabShard(0, VOCAB, VOCAB))
    upstream = torch.randn(9, generator=g)
    (ours_grad,) = torch.autograd.grad(ours, logits, upstream)
    theirs = cross_entropy(logits, targets)
    (theirs_grad,) = torch.autograd.grad(theirs, logits, upstream)
    _close(ours, theirs, "cross-entropy", 1e-6)
    _close(ours_grad, theirs_grad, "cross-entropy gradient", 1e-6)


def test_eval_chunks_are_the_unfused_logits(monkeypatch):
    monkeypatch.setattr(fused, "CPU_CHUNK_NUMEL", 4 * VOCAB)
    x = _inputs(softcap=4.0)
    chunks = list(logit_chunks(x["hidden"], OutputLayer(x["weight"], x["bias"], 4.0), x["teacher_hidden"],
                               OutputLayer(x["teacher_weight"], None, 4.0), shard=VocabShard(0, VOCAB, VOCAB),
                               real_vocab_size=REAL))
    assert [c[1].shape[0] for c in chunks] == [4, 4, 4, 2]
    student = _head(x["hidden"], x["weight"], x["bias"], 4.0)
    student[:, REAL:] = float("-inf")
    # A GEMM on 4 rows need not round as one on all 14 does: equal to the last bits, not bitwise.
    torch.testing.assert_close(torch.cat([c[1] for c in chunks]), student, rtol=1e-6, atol=1e-6)


def _sharded_worker(rank, world_size, numel):
    fused.CPU_CHUNK_NUMEL = numel
    bounds = SLICES[world_size]
    start, size = sum(bounds[:rank]), bounds[rank]
    results = []
    for settings, softcap in itertools.product(SETTINGS, (None, 4.0)):
        x = _inputs(softcap=softcap)
        *result, backward_calls = _fused(x, settings, start, size, dist.group.WORLD)
        results.append((result, backward_calls))
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_slices_on_ranks_equal_one_process(world_size):
    numel = 2 * (-(-VOCAB // world_size))  # 2 rows per chunk on every rank, whatever its own slice
    outputs = run_on_ranks(world_size, _sharded_worker, numel, deepspeed=True)
    bounds = SLICES[world_size]
    for i, (settings, softcap) in enumerate(itertools.product(SETTINGS, (None, 4.0))):
        x = _inputs(softcap=softcap)
        reference = _reference(x, settings)
        for rank in range(world_size):
            (result, calls) = outputs[rank][i]
            _check(result, reference, sum(bounds[:rank]), bounds[rank])
            # Backward: exactly one collective, the all-reduce of the hidden-state gradient.
            assert calls == {"all_reduce": 1}, (settings, calls)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_bf16_is_as_close_to_fp32_as_the_unfused_path(monkeypatch, softcap):
    """bf16 tolerance, justified: both paths round the logits to bf16 (8 bits of mantissa, 2^-8 relative
    per element) before the loss, so neither can match fp32 to 1e-5. The unfused path also rounds the
    logits' gradient to bf16 before one GEMM over all tokens; the fused path rounds each chunk's GEMM
    output and sums chunks in fp32. So: the loss within 1e-2 relative of the unfused bf16 loss, and each
    gradient's distance from the fp32 result of the same bf16 inputs no more than 1.5x the unfused
    path's distance plus 1e-3 of the gradient's size."""
    monkeypatch.setattr(fused, "CPU_CHUNK_NUMEL", 3 * VOCAB)  # 3-row chunks: the weight gradient is summed
    x = _inputs(softcap=softcap)
    low = {name: value.to(torch.bfloat16) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
           for name, value in x.items()}
    exact = {name: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
             for name, value in low.items()}
    settings = dict(kind="tail", top_k=7, beta=2.0, temperature=2.0, ce_weight=0.2)
    reference_out, reference_grads = _reference(exact, settings)
    unfused_out, unfused_grads = _reference(low, settings)
    total, _, fused_grads = _fused(low, settings)
    assert abs(total - unfused_out["loss"].sum()) <= 1e-2 * unfused_out["loss"].sum().abs()
    for name, ref, unfused, ours in zip(("hidden", "weight", "bias"), reference_grads, unfused_grads, fused_grads):
        unfused_error = (unfused.float() - ref).norm()
        fused_error = (ours.float() - ref).norm()
        assert ours.dtype == torch.bfloat16, name
        assert fused_error <= 1.5 * unfused_error + 1e-3 * ref.norm(), (name, fused_error, unfused_error)
