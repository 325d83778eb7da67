"""What the loss registry tells the rest of the code about each kind, checked against figures
written out here independently of it."""

import pytest
import torch

from loss import combine, tail_divergence
from loss.metrics import objective_metrics
from loss.objective import OUTPUTS, distillation_objective
from loss.registry import BASELINE, LOSSES
from tests.reference import top_k_mask


@pytest.mark.parametrize("top_k, vocab, expected", [
    (0, 100, 5 + 2),  # no top-K: 5 statistics and the teacher's argmax (2)
    (1, 100, 5 + 3),
    (10, 100, 5 + 30),  # K candidates travel with teacher logit, student logit and id
    (100, 100, 5 + 300),
    (250, 100, 5 + 300),  # K is clamped to the vocabulary
])
def test_tail_exchange_is_five_statistics_and_three_numbers_per_candidate(top_k, vocab, expected):
    assert LOSSES["tail"].exchange_numbers(top_k, vocab) == expected
    assert LOSSES["topk_bucket"].exchange_numbers(top_k, vocab) == expected  # the same pass


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "ce"])
def test_other_kinds_exchange_two_argmaxes(kind):
    for top_k, vocab in ((0, 7), (10, 32000), (10**6, 10)):
        assert LOSSES[kind].exchange_numbers(top_k, vocab) == 2 + 2


@pytest.mark.parametrize("kind", sorted(set(LOSSES) - {"kl", "reverse_kl"}))
def test_buffer_bytes_are_the_tail_chunk_bound_for_the_chunked_kinds(kind):
    entry = LOSSES[kind]
    cpu_chunk, cuda_chunk = 1 << 18, 1 << 24  # loss.tail's CPU_CHUNK_NUMEL and CHUNK_NUMEL
    # Few logits: the chunk is all of them; 4 fp32 buffers, 2 more for 2-byte logits' fp32 copies.
    assert entry.buffer_bytes(10, 100, 4, "cpu") == 4 * 4 * 1000
    assert entry.buffer_bytes(10, 100, 2, "cuda") == 6 * 4 * 1000
    # Many logits: one chunk's worth, smaller on CPU.
    assert entry.buffer_bytes(4096, 32000, 2, "cpu") == 6 * 4 * cpu_chunk
    assert entry.buffer_bytes(4096, 32000, 2, "cuda") == 6 * 4 * cuda_chunk
    assert entry.buffer_bytes(4096, 32000, 4, "cuda") == 4 * 4 * cuda_chunk


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_the_kl_kinds_bound_deepspeeds_whole_tensor_temporaries(kind):
    """DeepSpeed's KL op is not chunked: its bound grows with every logit it is given (held to
    counted bytes in test_saved_bytes.py and test_plan_fused_logits.py)."""
    entry = LOSSES[kind]
    for device in ("cpu", "cuda"):
        assert entry.buffer_bytes(4096, 32000, 4, device) == 9 * 4 * 4096 * 32000
        assert entry.buffer_bytes(4096, 32000, 2, device) == 7 * 4 * 4096 * 32000


def _pair(rows=10, vocab=30):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(rows, vocab, generator=generator) * 2, torch.randn(rows, vocab, generator=generator) * 2


@pytest.mark.parametrize("kind", [name for name, entry in LOSSES.items() if entry.needs_teacher])
def test_each_kind_returns_kd_and_the_outputs_it_declares(kind):
    student, teacher = _pair()
    out = LOSSES[kind].compute(student, teacher, top_k=4, beta_for=lambda mass: 2.0, temperature=1.0, tp_group=None,
                               shard=None, donate_teacher=False)
    argmaxes = {"student_top1", "teacher_top1"}
    assert set(out) - argmaxes == {"kd", *LOSSES[kind].outputs}
    assert set(OUTPUTS) >= {"loss", "kd", "ce", *LOSSES[kind].outputs}


def test_the_tail_outputs_assemble_the_divergence_as_the_public_op_does():
    student, teacher = _pair()
    out = LOSSES["tail"].compute(student, teacher, top_k=4, beta_for=lambda mass: 2.0, temperature=1.0,
                                 tp_group=None, shard=None, donate_teacher=False)
    public = tail_divergence(student, teacher, top_k=4, beta=2.0)
    assert torch.equal(out["kd"], public)
    assert torch.equal(combine(out["head_kl"], out["tail_kl"], 2.0), public)
    assert torch.equal(LOSSES["tail"].metrics(out, 2.0)["tail_divergence"], public)


def _one_bucket_reference(student, teacher, top_k, temperature):
    """KL between the teacher's K+1 categories (p at its top-K ids, then 1 − their sum) and the
    student's at the same ids, in float64 from those K+1 probabilities alone."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    top = top_k_mask(teacher, top_k)
    p_top = p[top].view(p.shape[0], -1)
    q_top = q[top].view(q.shape[0], -1)
    p_cat = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_cat = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return (p_cat * (p_cat.log() - q_cat.log())).sum(-1)


@pytest.mark.parametrize("top_k, temperature", [(1, 1.0), (4, 2.0), (12, 0.7)])
def test_topk_bucket_is_the_one_bucket_kl_and_ignores_beta(top_k, temperature):
    student, teacher = _pair(rows=6, vocab=40)
    student.requires_grad_(True)
    reference_student = student.detach().double().requires_grad_(True)
    expected = _one_bucket_reference(reference_student, teacher, top_k, temperature)
    weights = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference_student)

    def no_beta(mass):
        raise AssertionError("topk_bucket must not ask for β")

    out = LOSSES["topk_bucket"].compute(student, teacher, top_k=top_k, beta_for=no_beta, temperature=temperature,
                                        tp_group=None, shard=None, donate_teacher=False)
    (grad,) = torch.autograd.grad((out["kd"] * weights.float()).sum(), student)
    # fp32 arithmetic against a float64 reference: relative error at fp32 rounding of O(V) sums.
    torch.testing.assert_close(out["kd"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    # The objective with any β and either β mode gives the same loss: β is not read.
    labels = torch.arange(6)
    rows = torch.tensor([0] * 3 + [1] * 3)
    losses = [distillation_objective(student, teacher, labels, kind="topk_bucket", top_k=top_k, beta=beta,
                                     beta_mode=mode, temperature=temperature, sequence_ids=rows,
                                     num_sequences=2)["loss"] for beta, mode in ((0.0, "constant"), (5.0, "sequence"))]
    assert torch.equal(losses[0], losses[1])
    torch.testing.assert_close(losses[0].double(), temperature**2 * expected, rtol=1e-5, atol=1e-6)


def test_topk_bucket_is_tail_at_beta_zero_where_the_tail_kl_is_finite():
    student, teacher = _pair()
    bucket = LOSSES["topk_bucket"].compute(student, teacher, top_k=4, beta_for=None, temperature=1.0,
                                           tp_group=None, shard=None, donate_teacher=False)
    assert torch.equal(bucket["kd"], tail_divergence(student, teacher, top_k=4, beta=0.0))
    assert LOSSES["topk_bucket"].uses_top_k and not LOSSES["topk_bucket"].uses_beta and LOSSES["tail"].uses_beta


@pytest.mark.parametrize("kind, metrics", [
    ("tail", {"tail_divergence", "teacher_tail_mass", "student_tail_mass"}),
    ("topk_bucket", {"tail_divergence", "teacher_tail_mass", "student_tail_mass"}),
    ("kl", {"forward_kl"}),
    ("reverse_kl", {"reverse_kl"}),
    ("ce", set()),
])
def test_the_metrics_each_kind_hands_to_the_evaluation(kind, metrics):
    student, teacher = _pair()
    labels = torch.arange(10) % 30
    out = distillation_objective(student, teacher, labels, kind=kind, top_k=4, beta=2.0)
    known = objective_metrics(out, kind=kind, beta=2.0, temperature=1.0)
    assert set(known) - {"student_top1", "teacher_top1", "nll"} == metrics
    assert ("nll" in known) == (kind == "ce")  # the cross-entropy is part of the loss for ce only (ce_weight 0)
    assert set(objective_metrics(out, kind=kind, beta=2.0, temperature=2.0)) <= {"student_top1", "teacher_top1",
                                                                                  "nll"}


def test_the_sweep_grid_and_names_per_kind():
    from eval.sweep import settings

    grid = settings(["ce", "kl", "reverse_kl", "tail", "topk_bucket"], [5, 10], [1.0, 2.0], [1.0, 2.5])
    assert [s.name for s in grid] == ["ce", "kl-t1", "kl-t2.5", "reverse_kl"] + [
        f"tail-k{k}-b{b}-t{t}" for k in (5, 10) for b in (1, 2) for t in (1, 2.5)] + [
        f"topk_bucket-k{k}-t{t}" for k in (5, 10) for t in (1, 2.5)]
    named = {s.name: s.overrides() for s in grid}
    assert named["ce"] == ["loss.kind=ce"] and named["reverse_kl"] == ["loss.kind=reverse_kl"]
    assert named["kl-t2.5"] == ["loss.kind=kl", "loss.temperature=2.5"]
    assert named["tail-k10-b2-t1"] == ["loss.kind=tail", "loss.top_k=10", "loss.beta=2.0", "loss.temperature=1.0"]
    assert named["topk_bucket-k5-t2.5"] == ["loss.kind=topk_bucket", "loss.top_k=5", "loss.temperature=2.5"]
    assert BASELINE in LOSSES


def test_the_report_shows_k_and_beta_for_kinds_that_use_them():
    from eval.report import markdown_table

    runs = [{"name": kind, "final": {}, "config": {"loss": {"kind": kind, "top_k": 7, "beta": 3.0}}}
            for kind in ("tail", "kl", "unknown", "topk_bucket")]
    rows = markdown_table(runs).splitlines()[2:]
    assert rows[0].startswith("| tail | tail | 7 | 3.0 |")
    assert rows[1].startswith("| kl | kl | – | – |") and rows[2].startswith("| unknown | unknown | – | – |")
    assert rows[3].startswith("| topk_bucket | topk_bucket | 7 | – |")  # K applies, β does not
