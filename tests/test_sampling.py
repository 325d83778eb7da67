"""model_parallel.sampling: the counter-based noise and the vocabulary-sharded Gumbel-max sampler.

Against independent references: the draws against softmax(logits / τ) (chi-square), the noise
against the documented hash written here with unsigned 32-bit arithmetic, greedy against the first
maximum found by numpy, and the sharded draws (1, 2 and 4 gloo ranks, uneven slices) against the
one-process draw. scipy and the host-sync counter are imported inside the tests that use them, so
the spawned ranks import only torch and the library.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from model_parallel import counter_uniform, sample_tokens
from model_parallel.sampling import _to_unit
from model_parallel.spawn import run_on_ranks

# p-value thresholds: a correct sampler fails one of these tests about once in 10,000 seeds; the
# wrong distributions and the weak generator below land far under POWER_P.
FIT_P = 1e-4
POWER_P = 1e-6


# ---------------------------------------------------------------------------------------------
# The noise
# ---------------------------------------------------------------------------------------------

def _lowbias32(x: int) -> int:
    """The documented mixer, in unsigned 32-bit arithmetic (no int64 residue trick)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def _reference_uniform(seed, step, sequence, position, token) -> float:
    """The module docstring's hash, one element, with Python ints."""
    words = lambda key: (key % 2**64 % 2**32, key % 2**64 // 2**32)  # noqa: E731
    streams = []
    for start, token_start in ((0x9E3779B9, 0xC2B2AE3D), (0x85EBCA77, 0x27D4EB2F)):
        h = start
        for key in (seed, step, position):
            for word in words(key):
                h = _lowbias32(h ^ word)
        lo, hi = words(sequence)
        row = _lowbias32(_lowbias32(h ^ lo) ^ hi)
        lo, hi = words(token)
        col = _lowbias32(_lowbias32(token_start ^ hi) ^ lo)
        streams.append(_lowbias32(row ^ col))
    k = streams[0] * 2**21 + streams[1] // 2**11
    return k / 2**53 if k else 2.0**-54


def test_the_noise_is_the_documented_hash():
    """Keys past 32 and 63 bits, a negative sequence id (taken modulo 2**64) and a token id past 2**32."""
    sequence = torch.tensor([0, 1, 7, -1, 2**35 + 3], dtype=torch.int64)
    tokens = torch.tensor([0, 1, 2, 511, 2**33 + 9], dtype=torch.int64)
    for seed, step, position in ((0, 0, 0), (5, 17, 3), (2**63 + 5, 2**40 + 1, 2**32 + 2), (2**64 - 1, 0, 63)):
        got = counter_uniform(seed, step, sequence, position, tokens)
        expected = torch.tensor([[_reference_uniform(seed, step, s, position, t) for t in tokens.tolist()]
                                 for s in sequence.tolist()], dtype=torch.float64)
        assert got.dtype == torch.float64 and got.shape == (5, 5)
        assert torch.equal(got, expected), (seed, step, position)


def test_the_unit_map_is_strictly_inside_the_interval_with_53_bits():
    k = torch.tensor([0, 1, 2, 2**52, 2**53 - 2, 2**53 - 1], dtype=torch.int64)
    expected = torch.tensor([2.0**-54, 2.0**-53, 2.0**-52, 0.5, 1 - 2.0**-52, 1 - 2.0**-53], dtype=torch.float64)
    assert torch.equal(_to_unit(k), expected)


def _grid(seed=3, step=9, rows=50, position=4, tokens=60, first_token=0):
    return counter_uniform(seed, step, torch.arange(rows, dtype=torch.int64), position,
                           torch.arange(first_token, first_token + tokens, dtype=torch.int64))


def test_the_same_keys_give_the_same_noise_and_any_changed_key_changes_all_of_it():
    base = _grid()
    assert torch.equal(_grid(), base)
    for delta in (1, 2**32):  # the low word, then the high word alone
        changed = {
            "seed": _grid(seed=3 + delta),
            "step": _grid(step=9 + delta),
            "position": _grid(position=4 + delta),
            "sequence": counter_uniform(3, 9, torch.arange(50, dtype=torch.int64) + delta, 4,
                                        torch.arange(60, dtype=torch.int64)),
            "token id": _grid(first_token=delta),
        }
        for key, other in changed.items():
            assert (other != base).all(), f"{key} + {delta} left some values unchanged"
    # A sub-grid is the same noise: it depends on the keys, not on the tensors' shapes.
    rows, tokens = torch.tensor([7, 2], dtype=torch.int64), torch.tensor([59, 0, 30], dtype=torch.int64)
    part = counter_uniform(3, 9, rows, 4, tokens)
    assert torch.equal(part, base[[7, 2]][:, [59, 0, 30]])


def test_the_noise_is_uniform_with_53_bits():
    from scipy import stats

    u = _grid(seed=21, step=2, rows=400, tokens=250).flatten()  # 100,000 values
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > FIT_P
    k = (u * 2**53).to(torch.int64)
    assert torch.equal(k.to(torch.float64), u * 2**53)  # integers: k · 2**-53
    # Bits on either side of the two streams' junction (bit 21) and the extremes are fair coins:
    # within 5 standard deviations (0.5 / sqrt(n)) of 1/2.
    for bit in (0, 10, 20, 21, 40, 52):
        share = ((k >> bit) & 1).double().mean().item()
        assert abs(share - 0.5) < 5 * 0.5 / len(k) ** 0.5, (bit, share)


def _dependence_p(first: torch.Tensor, second: torch.Tensor, bins=8):
    """(chi-square p of independence on a bins × bins table, Pearson r) of paired uniforms."""
    from scipy import stats

    a, b = (first * bins).long().flatten(), (second * bins).long().flatten()
    table = torch.bincount(a * bins + b, minlength=bins * bins).view(bins, bins).numpy()
    return stats.chi2_contingency(table).pvalue, stats.pearsonr(first.flatten().numpy(), second.flatten().numpy())


def _neighbours(key):
    """Noise at key and key + 1, the other keys fixed, over a 400 × 250 grid (100,000 pairs)."""
    rows, tokens = torch.arange(400, dtype=torch.int64), torch.arange(250, dtype=torch.int64)
    if key == "token id":
        u = counter_uniform(8, 1, rows, 2, torch.arange(251, dtype=torch.int64))
        return u[:, :-1], u[:, 1:]
    if key == "sequence":
        u = counter_uniform(8, 1, torch.arange(401, dtype=torch.int64), 2, tokens)
        return u[:-1], u[1:]
    keys = {"seed": 8, "step": 1, "position": 2}
    pair = []
    for shift in (0, 1):
        shifted = dict(keys, **{key: keys[key] + shift})
        pair.append(counter_uniform(shifted["seed"], shifted["step"], rows, shifted["position"], tokens))
    return pair


@pytest.mark.parametrize("key", ["token id", "position", "sequence", "step", "seed"])
def test_neighbouring_keys_give_independent_noise(key):
    first, second = _neighbours(key)
    p_table, pearson = _dependence_p(first, second)
    assert p_table > FIT_P and pearson.pvalue > FIT_P, (key, p_table, pearson)


def test_the_independence_check_sees_a_weak_generator():
    """Its power: a Weyl sequence u_v = frac(v · φ) looks uniform, but neighbours are tied."""
    v = torch.arange(100_001, dtype=torch.float64)
    weyl = torch.frac(v * (5 ** 0.5 - 1) / 2)
    p_table, _ = _dependence_p(weyl[:-1], weyl[1:])
    assert p_table < POWER_P


# ---------------------------------------------------------------------------------------------
# The sampler on one process
# ---------------------------------------------------------------------------------------------

LOGITS_7 = torch.tensor([1.5, -0.5, 0.8, 0.0, -2.0, 1.1, 0.3], dtype=torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_follow_the_softmax(temperature):
    """20,000 rows of the same logits (one call, rows keyed by their sequence id) against
    softmax(logits / τ) in float64: p > FIT_P; the same counts against τ off by 20% either way:
    p < POWER_P. A padded (-inf) column is never drawn."""
    from scipy import stats

    draws = 20_000
    logits = torch.cat([LOGITS_7, torch.tensor([float("-inf")])]).expand(draws, 8)
    tokens = sample_tokens(logits, temperature=temperature, start=0, group=None, seed=11, step=3,
                           sequence=torch.arange(draws, dtype=torch.int64), position=2)
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[7] == 0 and counts.sum() == draws

    def p_value(tau):
        expected = torch.softmax(LOGITS_7.double() / tau, dim=0) * draws
        return stats.chisquare(counts[:7].numpy(), expected.numpy()).pvalue

    assert p_value(temperature) > FIT_P
    assert p_value(temperature * 1.2) < POWER_P and p_value(temperature / 1.2) < POWER_P


def _first_maximum(logits: torch.Tensor) -> torch.Tensor:
    rows = logits.numpy()
    return torch.tensor([int(np.flatnonzero(row == row.max())[0]) for row in rows], dtype=torch.int64)


def test_a_row_draws_the_same_token_whatever_the_batch():
    """Rows keyed by their sequence id: a permuted or partial batch draws each row's token again."""
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(1)) * 2
    sequence = torch.arange(100, 132, dtype=torch.int64)
    args = dict(temperature=1.0, start=0, group=None, seed=4, step=6, position=9)
    tokens = sample_tokens(logits, sequence=sequence, **args)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_tokens(logits[order], sequence=sequence[order], **args), tokens[order])
    assert torch.equal(sample_tokens(logits[5:9], sequence=sequence[5:9], **args), tokens[5:9])
    # The noise decides: other steps or positions draw other tokens on most rows.
    for other in (dict(args, step=7), dict(args, position=10)):
        assert (sample_tokens(logits, sequence=sequence, **other) != tokens).sum() > 16


@pytest.mark.parametrize("change, named", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(seed=-1), "seed"),
    (dict(step=2**64), "step"),
    (dict(position=1.0), "position"),
    (dict(start=-3), "start"),
    (dict(sequence=torch.arange(4, dtype=torch.int32)), "sequence"),
    (dict(sequence=torch.arange(5, dtype=torch.int64)), "sequence"),
    (dict(logits=torch.zeros(4, 6, dtype=torch.int64)), "logits"),
    (dict(logits=torch.zeros(4, 0)), "empty"),
])
def test_bad_arguments_are_refused_by_name(change, named):
    args = dict(logits=torch.zeros(4, 6), temperature=1.0, start=0, group=None, seed=0, step=0,
                sequence=torch.arange(4, dtype=torch.int64), position=0)
    args.update(change)
    logits = args.pop("logits")
    with pytest.raises(ValueError, match=named):
        sample_tokens(logits, **args)


def test_no_host_sync(monkeypatch):
    """tests/test_host_syncs.py's counter, on the sampled and the greedy path; the all-gather stands
    in as two ranks proposing the same candidates, so the tie-break over ranks runs too."""
    import model_parallel.collectives as collectives
    import model_parallel.sampling as sampling
    from tests.test_host_syncs import SyncCounter

    two_ranks = lambda local, group: torch.stack([local, local], dim=1)  # noqa: E731
    monkeypatch.setattr(sampling, "gather_rows", two_ranks)
    monkeypatch.setattr(collectives, "gather_rows", two_ranks)
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    sequence = torch.arange(6, dtype=torch.int64)
    with SyncCounter() as counter:
        for temperature in (0.0, 0.8):
            sample_tokens(logits, temperature=temperature, start=40, group=object(), seed=1, step=2,
                          sequence=sequence, position=3)
    assert counter.events == []


# ---------------------------------------------------------------------------------------------
# Layout independence: 1, 2 and 4 ranks (uneven slices) in one spawn of 4 gloo processes
# ---------------------------------------------------------------------------------------------

VOCAB = 97
PADDED = 6  # the last columns, set to -inf as the job does for padded vocabulary rows
FOUR = [3, 40, 20, 34]  # the 4-rank group's slices (rank 0 holds only 3 columns)
PAIRS = ([90, 7], [13, 84])  # ranks 0-1 and ranks 2-3: two 2-rank groups, each its own slices
# (temperature, seed, step, position): greedy, then draws with keys past 32 bits.
CASES = [(0.0, 1, 0, 0), (0.7, 1, 0, 0), (1.0, 1, 3, 5), (1.0, 2**40 + 3, 2**33, 7), (2.5, 7, 1, 0)]


def _layout_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(48, VOCAB, generator=generator) * 2
    logits[:8] = torch.round(logits[:8])  # exact ties, across slice boundaries
    logits[8:10] = 0.5  # a constant row: every id ties
    logits[10, 20:60] = 4.0  # a tie across the 4-rank slices 3|43 and the pairs' 13|84
    logits[:, VOCAB - PADDED:] = float("-inf")
    logits[11] = float("-inf")  # a fully masked row
    return logits


def _sequence():
    return torch.arange(1000, 1048, dtype=torch.int64)


def _draw(logits, start, group, case):
    temperature, seed, step, position = case
    return sample_tokens(logits, temperature=temperature, start=start, group=group, seed=seed, step=step,
                         sequence=_sequence().to(logits.device), position=position)


def _layout_worker(rank, world_size):
    """Each case's tokens and (collective calls, bytes sent), on the 4-rank group and on this rank's pair."""
    from model_parallel.testing.comm_counter import count_collective_bytes

    logits = _layout_logits()
    # Every rank creates both pair groups, in the same order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = {}
    for name, group, bounds, tp_rank in (("four", dist.group.WORLD, FOUR, rank),
                                         ("pair", pairs[rank // 2], PAIRS[rank // 2], rank % 2)):
        start = sum(bounds[:tp_rank])
        local = logits[:, start:start + bounds[tp_rank]]
        for case in CASES:
            with count_collective_bytes() as counted:
                tokens = _draw(local, start, group, case)
            results[name, case] = tokens, (counted.total_calls, counted.total_bytes)
    return results


def test_the_same_tokens_on_1_2_and_4_ranks():
    """Greedy and sampled tokens on every rank of the 4-rank group and of both pairs equal the
    one-process draw; greedy is the first maximum; one all-gather of [B, 2] per call (float64
    scores and ids when sampling, global_argmax's float32 when greedy)."""
    per_rank = run_on_ranks(4, _layout_worker, timeout=120)
    logits = _layout_logits()
    greedy = _first_maximum(logits)
    greedy[11] = 0  # the fully masked row: every id ties
    alone = {case: _draw(logits, 0, None, case) for case in CASES}
    for case, tokens in alone.items():
        if case[0] == 0:
            assert torch.equal(tokens, greedy)
        else:
            real = torch.arange(48) != 11
            assert (tokens[real] < VOCAB - PADDED).all() and tokens[11] == 0
            assert (tokens != greedy).sum() > 10, case  # the draws are not the argmax
    for rank, results in enumerate(per_rank):
        for layout in ("four", "pair"):
            for case in CASES:
                tokens, collectives = results[layout, case]
                assert torch.equal(tokens, alone[case]), (rank, layout, case)
                assert collectives == (1, 48 * 2 * (4 if case[0] == 0 else 8)), (rank, layout, case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_noise_and_the_draws_are_the_same_on_cuda():
    """Integer ops only up to one exact conversion: u is bitwise equal on CPU and CUDA."""
    sequence = torch.arange(300, dtype=torch.int64) - 5
    tokens = torch.arange(2**32 - 100, 2**32 + 900, dtype=torch.int64)
    cpu = counter_uniform(2**40 + 1, 17, sequence, 2**33, tokens)
    assert torch.equal(counter_uniform(2**40 + 1, 17, sequence.cuda(), 2**33, tokens.cuda()).cpu(), cpu)
    logits = _layout_logits()
    for case in CASES:
        got = _draw(logits.cuda(), 0, None, case)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), _draw(logits, 0, None, case)), case
