"""The DeepSpeed-backed baselines and per_token_loss, against float64 references."""

import pytest
import torch
import torch.distributed as dist

from loss import cross_entropy, forward_kl, reverse_kl, tail_divergence
from model_parallel.spawn import run_on_ranks
from tests.losses import LOSS_KINDS, per_token_loss
from tests.reference import reference_kl


def _pair(rows=6, vocab=41, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * 2, torch.randn(rows, vocab, generator=generator) * 2


def _labels(rows=6, vocab=41):
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(9))
    labels[1] = -100
    return labels


def _reference_ce(student, labels):
    log_q = torch.log_softmax(student.double(), -1)
    picked = -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(picked), picked)


def test_forward_and_reverse_kl_match_reference():
    student, teacher = _pair()
    torch.testing.assert_close(forward_kl(student, teacher, temperature=2.0).double(),
                               reference_kl(student, teacher, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reverse_kl(student, teacher, temperature=2.0).double(),
                               reference_kl(teacher, student, 2.0), rtol=1e-5, atol=1e-6)


def test_kl_gradient_reaches_only_the_student():
    student, teacher = _pair()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    forward_kl(student, teacher).sum().backward()
    assert teacher.grad is None
    leaf = student.detach().double().requires_grad_(True)
    reference_kl(leaf, teacher.detach()).sum().backward()
    torch.testing.assert_close(student.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_reference():
    student, _ = _pair()
    labels = _labels()
    torch.testing.assert_close(cross_entropy(student, labels).double(), _reference_ce(student, labels), rtol=1e-5,
                               atol=1e-6)


def test_per_token_loss_dispatches_by_name():
    student, teacher = _pair()
    labels = _labels()
    expected = {
        "tail": tail_divergence(student, teacher, top_k=3, beta=2.0, temperature=1.5),
        "topk_bucket": tail_divergence(student, teacher, top_k=3, beta=0.0, temperature=1.5),  # β ignored: 0
        "kl": forward_kl(student, teacher, temperature=1.5),
        "reverse_kl": reverse_kl(student, teacher, temperature=1.5),
        "ce": cross_entropy(student, labels),
    }
    assert set(expected) == set(LOSS_KINDS)
    for kind, value in expected.items():
        got = per_token_loss(kind, student, teacher, labels, top_k=3, beta=2.0, temperature=1.5)
        torch.testing.assert_close(got, value)
    with pytest.raises(ValueError, match="unknown kind 'js'"):
        per_token_loss("js", student, teacher)
    with pytest.raises(ValueError, match="needs labels"):
        per_token_loss("ce", student, teacher)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        per_token_loss("kl", student)


BOUNDS = [30, 11]


def _sharded_baselines(rank, world_size):
    student, teacher = _pair()
    labels = _labels()
    start = sum(BOUNDS[:rank])
    local_student = student[:, start:start + BOUNDS[rank]].clone().requires_grad_(True)
    local_teacher = teacher[:, start:start + BOUNDS[rank]]
    group = dist.group.WORLD
    kl = forward_kl(local_student, local_teacher, temperature=1.5, tp_group=group)
    kl.sum().backward()
    return {
        "kl": kl.detach(),
        "kl_grad": local_student.grad,
        "reverse_kl": reverse_kl(local_student, local_teacher, temperature=1.5, tp_group=group).detach(),
        "ce": cross_entropy(local_student, labels, tp_group=group).detach(),
    }


def test_baselines_on_uneven_slices_match_one_process():
    per_rank = run_on_ranks(2, _sharded_baselines, deepspeed=True)
    student, teacher = _pair()
    leaf = student.clone().requires_grad_(True)
    forward_kl(leaf, teacher, temperature=1.5).sum().backward()
    expected = {
        "kl": forward_kl(student, teacher, temperature=1.5),
        "reverse_kl": reverse_kl(student, teacher, temperature=1.5),
        "ce": cross_entropy(student, _labels()),
    }
    for rank, result in enumerate(per_rank):
        for name, value in expected.items():
            torch.testing.assert_close(result[name], value, rtol=1e-6, atol=1e-6)
        start = sum(BOUNDS[:rank])
        torch.testing.assert_close(result["kl_grad"], leaf.grad[:, start:start + BOUNDS[rank]], rtol=1e-6, atol=1e-7)
