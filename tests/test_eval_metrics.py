"""Evaluation metrics against hand-computed values and single-device references."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from loss.metrics import EvalSums, frequency_bands, full_ece, full_ece_bins, top1_ece_bins
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


# ---------------------------------------------------------------------------------------------
# Tail metrics: frequency bands of the training counts, against float64 numpy on full logits


def test_frequency_bands_by_hand():
    # Sorted: id 0 (50; 0 before it: frequent), ids 2, 3 (20, 20; 50 and 70 before), id 4 (5; 90
    # before: < 95, middle), ids 5, 6 (3, 2; 95 and 98 before: rare), id 1 and the two padded ids unseen.
    bands = frequency_bands(np.array([50, 0, 20, 20, 5, 3, 2]), vocab_size=9)
    assert bands.band.tolist() == [0, 2, 1, 1, 1, 2, 2, 2, 2]
    assert bands.summary == {"frequent_tokens": 1, "middle_tokens": 3, "rare_tokens": 5, "unseen_tokens": 3,
                             "frequent_share": 0.5, "rare_share": 0.05, "frequent_min_count": 50,
                             "rare_max_count": 3, "training_tokens": 100}
    # Scale-free: a hundred times the corpus gives the same bands.
    assert torch.equal(frequency_bands(np.array([50, 0, 20, 20, 5, 3, 2]) * 100, vocab_size=9).band, bands.band)
    with pytest.raises(ValueError, match="positive total"):
        frequency_bands(np.zeros(5, dtype=np.int64))
    # Ids of equal count share a band, whatever their numbering: four ids of 10 (the 50% cut falls
    # between the second and third) are all frequent, and a permuted vocabulary permutes the bands.
    assert frequency_bands(np.array([10, 10, 10, 10])).band.tolist() == [0, 0, 0, 0]
    counts = np.array([40, 9, 9, 9, 9, 5, 1, 1, 1, 0])
    order = np.random.default_rng(0).permutation(len(counts))
    assert frequency_bands(counts[order]).band.tolist() == frequency_bands(counts).band[order].tolist()
    assert frequency_bands(counts).band.tolist() == _reference_bands(counts).tolist()


def _reference_bands(counts):
    """Bands by a plain loop over the counts sorted descending: the two thresholds where the running
    total crosses 50% and 95%, then each id by its own count."""
    total, seen, frequent_min, rare_max = counts.sum(), 0, None, -1
    for count in sorted(counts, reverse=True):
        if seen < 0.5 * total:
            frequent_min = count
        if seen >= 0.95 * total and rare_max < 0:
            rare_max = count
        seen += count
    return np.array([0 if c >= frequent_min else 2 if c <= rare_max else 1 for c in counts], dtype=np.int64)


def _reference_full_ece(logits, targets, n_bins=10):
    probabilities = np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    hits = np.zeros_like(probabilities)
    hits[np.arange(len(targets)), targets] = 1
    index = np.minimum((probabilities * n_bins).astype(np.int64), n_bins - 1).ravel()
    gap = np.bincount(index, weights=(hits - probabilities).ravel(), minlength=n_bins)
    return np.abs(gap).sum() / probabilities.size


def _reference_tail_metrics(student, targets, sequences, band):
    """nll per band, full_ece_rare and nll_rare_sequences (token-weighted, the top 10% of sequences
    by rare-target share, at least one), float64 numpy on the whole vocabulary."""
    logits, keep = student.double().numpy(), (targets != -100).numpy()
    logits, targets, sequences = logits[keep], targets.numpy()[keep], sequences[keep]
    nll = -(logits[np.arange(len(targets)), targets] - np.log(np.exp(logits).sum(-1)))
    of = band[targets]
    out = {f"nll_{name}": nll[of == index].mean() for index, name in enumerate(("frequent", "middle", "rare"))}
    out["full_ece_rare"] = _reference_full_ece(logits[of == 2], targets[of == 2])
    share = {s: np.mean(of[sequences == s] == 2) for s in np.unique(sequences)}
    richest = sorted(share, key=lambda s: -share[s])[:math.ceil(0.1 * len(share))]
    chosen = np.isin(sequences, richest)
    out["nll_rare_sequences"] = nll[chosen].mean()
    return out


def _tail_data(rows=120, vocab=61):
    """Zipf-like training counts (a few unseen ids), logits, targets drawn from the counts (so every
    band has positions), every seventh position ignored, twelve sequences of ten positions."""
    generator = np.random.default_rng(3)
    counts = (1000 / np.arange(1, vocab + 1) ** 1.3).astype(np.int64)[generator.permutation(vocab)]
    counts[generator.choice(vocab, 4, replace=False)] = 0
    student = torch.from_numpy(generator.normal(size=(rows, vocab)) * 2)
    targets = torch.from_numpy(generator.choice(vocab, rows, p=(counts + 2) / (counts + 2).sum()))
    targets[::7] = -100
    return counts, student.float(), targets, np.arange(rows) // 10


def _tail_sums(student, targets, band, *, tp_group=None, batches=((0, 60), (60, 120)), chunks=2):
    """EvalSums over ``batches`` (row ranges, ten positions a sequence), each added in ``chunks``
    pieces as the fused path does; sequence ids are batch-local."""
    sums = EvalSums(top_k=5, beta=2.0, tp_group=tp_group, bands=band)
    for first, end in batches:
        sums.start_batch((end - first) // 10)
        keep = torch.nonzero(targets[first:end] != -100)[:, 0] + first
        for piece in torch.tensor_split(keep, chunks):
            sums.add(student[piece], None, targets[piece], sequence_ids=(piece - first) // 10)
    return sums


def test_tail_metrics_equal_a_float64_reference():
    counts, student, targets, sequences = _tail_data()
    band = _reference_bands(counts)
    bands = frequency_bands(counts)
    assert bands.band.tolist() == band.tolist() and min(bands.summary[f"{b}_tokens"] for b in ("frequent", "rare")) > 0
    result = _tail_sums(student, targets, bands.band).result()
    for name, value in _reference_tail_metrics(student, targets, sequences, band).items():
        # float32 logits in EvalSums against float64 here: the NLLs agree to float32 rounding.
        assert result[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert result["rare_sequences"] == 2  # ten percent of 12 sequences, rounded up
    assert sum(result[f"tokens_{b}"] for b in ("frequent", "middle", "rare")) == result["tokens"]


def test_a_band_without_positions_is_nan():
    counts, student, targets, _ = _tail_data()
    band = torch.zeros(len(counts), dtype=torch.long)  # every target frequent: no middle, no rare
    sums = _tail_sums(student, targets, band)
    scalars, bins = sums.reduce()
    assert math.isnan(scalars["nll_rare"]) and math.isnan(scalars["nll_middle"])
    assert math.isnan(scalars["full_ece_rare"]) and math.isnan(scalars["nll_rare_sequences"])
    assert scalars["nll_frequent"] == pytest.approx(scalars["nll"]) and scalars["tokens_rare"] == 0
    assert "full_rare" in bins and "nll_rare" not in EvalSums(top_k=5, beta=2.0).result()


BOUNDS = [20, 7, 34]


def _sharded(rank, world_size):
    student, teacher, targets = _data()
    start = sum(BOUNDS[:rank])
    local = slice(start, start + BOUNDS[rank])
    group = dist.group.WORLD
    keep = targets != -100
    sums = EvalSums(top_k=5, beta=2.0, tp_group=group)
    sums.add(student[keep][:, local], teacher[keep][:, local], targets[keep])
    counts, tail_student, tail_targets, _ = _tail_data()
    band = frequency_bands(counts).band
    # Tensor parallel: the tail metrics on uneven vocabulary slices (V = 61 over 3 ranks).
    tail_tp = _tail_sums(tail_student[:, local], tail_targets, band, tp_group=group).result()
    # Data parallel: each rank its own batches (2, 1 and 3 sequences), gathered at the reduce.
    rows = [(0, 20), (20, 30), (30, 60)][rank]
    tail_dp = _tail_sums(tail_student, tail_targets, band, batches=[rows], chunks=1).result(dp_group=group)
    return (full_ece_bins(student[:, local], targets, tp_group=group),
            top1_ece_bins(student[:, local], targets, tp_group=group), sums.result(), tail_tp, tail_dp)


def test_vocabulary_parallel_metrics_equal_one_device():
    student, teacher, targets = _data()
    keep = targets != -100
    sums = EvalSums(top_k=5, beta=2.0)
    sums.add(student[keep], teacher[keep], targets[keep])
    expected = (full_ece_bins(student, targets), top1_ece_bins(student, targets), sums.result())
    counts, tail_student, tail_targets, sequences = _tail_data()
    band = _reference_bands(counts)
    expected_tp = _reference_tail_metrics(tail_student, tail_targets, sequences, band)
    first = slice(0, 60)
    expected_dp = _reference_tail_metrics(tail_student[first], tail_targets[first], sequences[first], band)
    # Three DeepSpeed ranks start in about a minute on an idle 2-core machine; the hang limit leaves room
    # for a loaded one.
    for full, top1, result, tail_tp, tail_dp in run_on_ranks(3, _sharded, deepspeed=True, timeout=300):
        torch.testing.assert_close(full, expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(top1, expected[1], rtol=1e-6, atol=1e-6)
        assert result.keys() == expected[2].keys()
        for name in result:
            assert result[name] == pytest.approx(expected[2][name], rel=1e-5, abs=1e-7), name
        for name in expected_tp:
            assert tail_tp[name] == pytest.approx(expected_tp[name], rel=1e-5, abs=1e-7), name
            assert tail_dp[name] == pytest.approx(expected_dp[name], rel=1e-5, abs=1e-7), name
        assert tail_dp["rare_sequences"] == 1  # ten percent of the six sequences gathered, rounded up


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


def test_the_evaluation_json_leaves_out_empty_bands_and_names_them():
    from eval.evaluate import TAIL_METRICS, with_bands

    counts, student, targets, _ = _tail_data()
    scalars = _tail_sums(student, targets, torch.zeros(len(counts), dtype=torch.long)).result()  # no rare targets
    result = with_bands({"metrics": scalars, "bins": {}}, {"rare_tokens": 0})
    assert set(TAIL_METRICS) - set(result["metrics"]) == {"nll_middle", "nll_rare", "full_ece_rare",
                                                          "nll_rare_sequences"}
    assert result["bands"]["empty"] == ["nll_middle", "nll_rare", "full_ece_rare", "nll_rare_sequences"]
    assert result["bands"]["positions"] == {"frequent": scalars["tokens"], "middle": 0, "rare": 0}
    assert not any(isinstance(value, float) and math.isnan(value) for value in result["metrics"].values())
