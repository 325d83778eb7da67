"""Evaluation metrics against hand-computed values and single-device references."""

import math

import pytest
import torch
import torch.distributed as dist

from loss.metrics import EvalSums, full_ece, full_ece_bins, top1_ece_bins
from model_parallel.spawn import run_on_ranks


def test_full_ece_hand_computed():
    probabilities = torch.tensor([[0.65, 0.23, 0.12], [0.46, 0.36, 0.18]])
    targets = torch.tensor([0, 1])
    # Pairs (confidence, hit): (.65,1) (.23,0) (.12,0) (.46,0) (.36,1) (.18,0) in bins 6, 2, 1, 4, 3, 1.
    # Σ_m |hits_m − confidence_m| / N = (.35 + .23 + (.12 + .18) + .46 + .64) / 6
    expected = (0.35 + 0.23 + 0.30 + 0.46 + 0.64) / 6
    assert full_ece(probabilities.log(), targets, n_bins=10) == pytest.approx(expected, abs=1e-6)
    # An ignored position and a padded (-inf) column change nothing.
    padded = torch.cat([probabilities.log(), torch.full((2, 1), float("-inf"))], dim=1)
    padded = torch.cat([padded, torch.zeros(1, 4)])
    assert full_ece(padded, torch.tensor([0, 1, -100]), n_bins=10) == pytest.approx(expected, abs=1e-6)


def test_a_calibrated_predictor_beats_an_overconfident_one():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 50, generator=generator) * 2
    targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    calibrated = full_ece(logits, targets)
    overconfident = full_ece(logits * 4, targets)
    assert calibrated < 0.002 and overconfident > 5 * calibrated


def _data(rows=40, vocab=61):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(rows, vocab, generator=generator) * 2
    teacher = torch.randn(rows, vocab, generator=generator) * 2
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[3] = -100
    return student, teacher, targets


def _reference_perplexity(student, targets):
    keep = targets != -100
    nll = torch.nn.functional.cross_entropy(student[keep].double(), targets[keep])
    return math.exp(float(nll))


def test_perplexity_and_accuracy_match_independent_computations():
    student, teacher, targets = _data()
    sums = EvalSums(top_k=5, beta=2.0)
    keep = targets != -100
    sums.add(student[keep], teacher[keep], targets[keep])
    result = sums.result()
    assert result["perplexity"] == pytest.approx(_reference_perplexity(student, targets), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float((student[keep].argmax(-1) == targets[keep]).double().mean()))
    agreement = float((student[keep].argmax(-1) == teacher[keep].argmax(-1)).double().mean())
    assert result["top1_agreement"] == pytest.approx(agreement)
    kl = torch.nn.functional.kl_div(student[keep].double().log_softmax(-1), teacher[keep].double().log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1).mean()
    assert result["forward_kl"] == pytest.approx(float(kl), rel=1e-5)


def test_reduce_returns_the_bins_it_summed_and_changes_nothing():
    student, teacher, targets = _data()
    sums = EvalSums(top_k=5, beta=2.0, n_bins=7)
    halves = (slice(0, 3), slice(4, 40))  # row 3 is the ignored position
    for rows in halves:
        sums.add(student[rows], teacher[rows], targets[rows])
    scalars, bins = sums.reduce()
    for name, bin_sums in (("full", full_ece_bins), ("top1", top1_ece_bins)):
        expected = sum(bin_sums(student[rows], targets[rows], n_bins=7) for rows in halves)
        torch.testing.assert_close(torch.tensor(bins[name], dtype=torch.float64), expected)
    assert scalars["tokens"] == 39 and scalars == sums.result() and sums.reduce().bins == bins
    assert not hasattr(sums, "last_bins")


BOUNDS = [20, 7, 34]


def _sharded(rank, world_size):
    student, teacher, targets = _data()
    start = sum(BOUNDS[:rank])
    local = slice(start, start + BOUNDS[rank])
    group = dist.group.WORLD
    keep = targets != -100
    sums = EvalSums(top_k=5, beta=2.0, tp_group=group)
    sums.add(student[keep][:, local], teacher[keep][:, local], targets[keep])
    return (full_ece_bins(student[:, local], targets, tp_group=group),
            top1_ece_bins(student[:, local], targets, tp_group=group), sums.result())


def test_vocabulary_parallel_metrics_equal_one_device():
    student, teacher, targets = _data()
    keep = targets != -100
    sums = EvalSums(top_k=5, beta=2.0)
    sums.add(student[keep], teacher[keep], targets[keep])
    expected = (full_ece_bins(student, targets), top1_ece_bins(student, targets), sums.result())
    for full, top1, result in run_on_ranks(3, _sharded, deepspeed=True):
        torch.testing.assert_close(full, expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(top1, expected[1], rtol=1e-6, atol=1e-6)
        assert result.keys() == expected[2].keys()
        for name in result:
            assert result[name] == pytest.approx(expected[2][name], rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("loss", [
    dict(kind="tail", temperature=1.0, beta_mode="constant"),
    dict(kind="tail", temperature=1.0, beta_mode="sequence", ce_weight=0.3),
    dict(kind="kl", temperature=1.0),
    dict(kind="reverse_kl", temperature=1.0),
    dict(kind="tail", temperature=2.0),  # nothing but the argmaxes (and CE) can be reused
])
def test_evaluation_reusing_the_objective_equals_computing_every_metric(loss):
    """What the evaluation takes from the training objective (training.step._known_metrics) is
    exactly what EvalSums would compute itself."""
    from types import SimpleNamespace

    from loss.objective import distillation_objective
    from training.step import _known_metrics

    student, teacher, targets = _data()
    keep = targets != -100
    student, teacher, targets = student[keep], teacher[keep], targets[keep]
    cfg = SimpleNamespace(**{"top_k": 5, "beta": 2.0, "beta_mode": "constant", "ce_weight": 0.0, **loss})
    out = distillation_objective(student, teacher, targets, kind=cfg.kind, top_k=cfg.top_k, beta=cfg.beta,
                                 beta_mode=cfg.beta_mode, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                                 sequence_ids=torch.arange(targets.numel()) // 7)
    out["student_top1"], out["teacher_top1"] = student.argmax(-1), teacher.argmax(-1)
    reused, computed = EvalSums(top_k=5, beta=2.0), EvalSums(top_k=5, beta=2.0)
    reused.add(student, teacher, targets, known=_known_metrics(cfg, out))
    computed.add(student, teacher, targets)
    expected = computed.result()
    for name, value in reused.result().items():
        assert value == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name
