"""The resumable sharded sampler, the collator and the evaluation iterator."""

import pytest
import torch

from core.errors import DataError
from data.loader import Collator, GlobalBatchSampler, eval_batches

N = 103  # not a multiple of any global batch below: batches straddle epochs


def _sampler(dp_size, dp_rank, grad_accum=2, micro=3, consumed=0, seed=7):
    return GlobalBatchSampler(N, micro_batch_size=micro, grad_accum=grad_accum, dp_size=dp_size, dp_rank=dp_rank,
                              seed=seed, consumed_samples=consumed)


def _steps(sampler, steps):
    return [sampler.step_micro_batches() for _ in range(steps)]


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_one_epoch_over_all_ranks_is_the_whole_set(dp_size):
    global_batch = 3 * 2 * dp_size
    steps = -(-N // global_batch)
    seen = []
    for rank in range(dp_size):
        seen += [i for step in _steps(_sampler(dp_size, rank), steps) for micro in step for i in micro]
    # The first N positions of the stream are one permutation of the data set.
    stream = _sampler(dp_size, 0).stream(0, N)
    assert sorted(stream.tolist()) == list(range(N))
    assert set(seen) == set(range(N))


@pytest.mark.parametrize("num_samples, micro, accum, dp_size", [(103, 3, 2, 4), (97, 1, 4, 6), (50, 2, 3, 2)])
def test_no_global_batch_repeats_a_sample_across_epoch_boundaries(num_samples, micro, accum, dp_size):
    sampler = GlobalBatchSampler(num_samples, micro_batch_size=micro, grad_accum=accum, dp_size=dp_size, dp_rank=0,
                                 seed=11)
    size = sampler.global_batch_size
    for step in range(12 * num_samples // size):  # about a dozen epochs, many straddling batches
        batch = sampler.stream(step * size, size)
        assert len(set(batch.tolist())) == size, f"step {step} repeats a sample"
    for epoch in range(12):
        assert sorted(sampler.stream(epoch * num_samples, num_samples).tolist()) == list(range(num_samples))


def test_ranks_are_disjoint_and_tensor_parallel_peers_identical():
    ranks = [_steps(_sampler(4, rank), 10) for rank in range(4)]
    for step in range(10):
        batches = [set(i for micro in ranks[rank][step] for i in micro) for rank in range(4)]
        assert sum(len(b) for b in batches) == len(set().union(*batches)) == 24
    # Two tensor-parallel ranks of one data-parallel group pass the same dp_rank: same batches.
    assert _steps(_sampler(4, 2), 10) == ranks[2]


def test_global_batch_is_independent_of_the_data_parallel_size():
    """Step k holds the same samples at DP 4 × accum 1, DP 2 × accum 2 and DP 1 × accum 4."""
    per_layout = []
    for dp_size, accum in ((4, 1), (2, 2), (1, 4)):
        steps = [sorted(i for rank in range(dp_size) for micro in _sampler(dp_size, rank, accum).step_micro_batches()
                        for i in micro)]
        per_layout.append(steps)
    assert per_layout[0] == per_layout[1] == per_layout[2]


@pytest.mark.parametrize("resume_step", [0, 1, 5, 17, 34])
def test_resuming_from_any_step_gives_the_same_sequence(resume_step):
    straight = _steps(_sampler(2, 1), 40)
    head = _sampler(2, 1)
    _steps(head, resume_step)
    state = head.state_dict()
    assert state["consumed_samples"] == resume_step * 12 and state["epoch"] == resume_step * 12 // N
    resumed = _sampler(2, 1, consumed=state["consumed_samples"], seed=state["seed"])
    assert _steps(resumed, 40 - resume_step) == straight[resume_step:]


def test_shuffle_depends_on_seed_and_epoch():
    a, b = _sampler(1, 0, seed=1), _sampler(1, 0, seed=2)
    assert a.stream(0, N).tolist() != b.stream(0, N).tolist()
    assert a.stream(0, N).tolist() != a.stream(N, N).tolist()
    assert sorted(a.stream(N, N).tolist()) == list(range(N))


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        _sampler(2, 2)
    with pytest.raises(ValueError, match="multiple of the global batch size 12"):
        _sampler(2, 0, consumed=5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        _sampler(2, 0, micro=0)
    with pytest.raises(DataError, match="fewer than 4 global batches of 30"):
        _sampler(5, 0, micro=3)


def test_collator_pads_and_masks():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = Collator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    text = Collator(pad_token_id=0)([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])
    assert torch.equal(text["labels"], text["input_ids"])
    assert "attention_mask" not in text  # nothing padded: causal attention needs no mask


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_eval_visits_every_row_once_for_any_world_size(dp_size):
    rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(0, 22, 2)]  # 11 rows
    counted = []
    batches_per_rank = set()
    for rank in range(dp_size):
        batches = list(eval_batches(rows, batch_size=2, dp_size=dp_size, dp_rank=rank, collator=Collator(0)))
        batches_per_rank.add(len(batches))
        for batch in batches:
            for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
                if any(label != -100 for label in labels):
                    counted.append(ids[0])
    assert len(batches_per_rank) == 1  # every rank runs the same number of forwards
    assert sorted(counted) == list(range(0, 22, 2))
