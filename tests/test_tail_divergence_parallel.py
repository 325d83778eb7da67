"""tail_divergence on 2, 3 and 4 gloo ranks with uneven vocabulary slices vs one process."""

import pytest
import torch
import torch.distributed as dist

from loss import tail_divergence, tail_divergence_parts
from model_parallel import resolve_vocab_shard
from model_parallel.testing.comm_counter import count_collective_bytes
from model_parallel.spawn import run_on_ranks

VOCAB = 97
TOP_K = 10
# Uneven slices, some smaller than K, summing to VOCAB.
SLICES = {2: [90, 7], 3: [33, 4, 60], 4: [3, 40, 20, 34]}


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, VOCAB, generator=generator) * 3
    teacher = torch.randn(3, 5, VOCAB, generator=generator) * 3
    teacher[0] = torch.round(teacher[0])  # ties, across slice boundaries
    teacher[1, :2, :] = 1.0  # one value everywhere: the K lowest ids win
    student[2, 0, 80:] = teacher[2, 0, 80:] = float("-inf")  # padded columns
    student[2, 1, :] = teacher[2, 1, :] = float("-inf")  # a fully masked row
    beta = torch.rand(3, 5, generator=generator) * 3
    upstream = torch.randn(3, 5, generator=generator)
    return student.to(dtype), teacher.to(dtype), beta, upstream


def _value_and_grad(student, teacher, beta, upstream, tp_group, top_k=TOP_K, temperature=1.3):
    student = student.clone().requires_grad_(True)
    value = tail_divergence(student, teacher, top_k=top_k, beta=beta, temperature=temperature, tp_group=tp_group)
    parts, top1 = tail_divergence_parts(student.detach(), teacher, top_k=top_k, temperature=temperature,
                                        tp_group=tp_group, return_top1=True)
    value.backward(upstream)
    return value.detach(), torch.stack(parts), student.grad, top1


def _slice(x, bounds, rank):
    start = sum(bounds[:rank])
    return x[..., start:start + bounds[rank]]


def _sharded_worker(rank, world_size, bounds, subgroups):
    student, teacher, beta, upstream = _inputs()
    group = dist.group.WORLD
    if subgroups:  # two tensor-parallel groups of world_size // 2 ranks; each one holds its own slices
        size = world_size // 2
        groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(2)]
        group, rank = groups[rank // size], rank % size
    results = {}
    for top_k in (0, 1, TOP_K, VOCAB, VOCAB + 3):
        results[top_k] = _value_and_grad(_slice(student, bounds, rank), _slice(teacher, bounds, rank), beta, upstream,
                                         group, top_k)
    return results


@pytest.mark.parametrize("world_size, subgroups", [(2, False), (3, False), (4, False), (4, True)])
def test_values_and_gradient_slices_equal_one_process(world_size, subgroups):
    bounds = [50, 47] if subgroups else SLICES[world_size]
    per_rank = run_on_ranks(world_size, _sharded_worker, bounds, subgroups)
    student, teacher, beta, upstream = _inputs()
    for top_k in (0, 1, TOP_K, VOCAB, VOCAB + 3):
        value, parts, grad, _ = _value_and_grad(student, teacher, beta, upstream, None, top_k)
        for rank, results in enumerate(per_rank):
            tp_rank = rank % len(bounds)
            got_value, got_parts, got_grad, got_top1 = results[top_k]
            torch.testing.assert_close(got_value, value, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_parts, parts, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_grad, _slice(grad, bounds, tp_rank), rtol=1e-6, atol=1e-6)
            # The argmaxes of the same pass: the first maximum over the whole vocabulary (ties
            # across slice boundaries and constant rows included), on every rank.
            assert torch.equal(got_top1.student, student.argmax(dim=-1))
            if top_k:
                assert torch.equal(got_top1.teacher, teacher.argmax(dim=-1))
            else:
                assert got_top1.teacher is None  # no top-K taken
        # Every rank returns the very same per-token values.
        for results in per_rank[1:]:
            assert torch.equal(results[top_k][0], per_rank[0][top_k][0])


def _bytes_worker(rank, world_size, vocab_sizes):
    counted = {}
    for vocab in vocab_sizes:
        generator = torch.Generator().manual_seed(vocab)
        local = vocab // world_size
        student = torch.randn(64, local, generator=generator).requires_grad_(True)
        teacher = torch.randn(64, local, generator=generator)
        with count_collective_bytes() as forward:
            value = tail_divergence(student, teacher, top_k=TOP_K, beta=2.0, tp_group=dist.group.WORLD)
        with count_collective_bytes() as backward:
            value.sum().backward()
        counted[vocab] = (forward.total_bytes, forward.total_calls, backward.total_calls)
        # The layout resolved once and passed in (the job's path): the per-token exchange only.
        shard = resolve_vocab_shard(local, dist.group.WORLD, caller="test")
        with count_collective_bytes() as resolved:
            parts = tail_divergence_parts(student.detach(), teacher, top_k=TOP_K, tp_group=dist.group.WORLD,
                                          shard=shard)
        counted[f"shard {vocab}"] = (resolved.total_calls, torch.equal(parts.head_kl + 2.0 * parts.tail_kl, value))
    return counted


@pytest.mark.parametrize("world_size", [2, 4])
def test_communication_does_not_grow_with_the_vocabulary(world_size):
    counted = run_on_ranks(world_size, _bytes_worker, [256, 32768])[0]
    assert counted["shard 256"] == counted["shard 32768"] == (1, True)
    small, large = counted[256], counted[32768]
    assert small == large
    total_bytes, forward_calls, backward_calls = large
    assert backward_calls == 0
    assert forward_calls == 2  # the argument/layout check and one per-token all-gather
    # Per token per rank: 5 + 3K fp32 numbers (the student's argmax travels too); plus a few for the check.
    per_token = (5 + 3 * TOP_K) * 4
    assert 64 * per_token <= total_bytes <= 64 * per_token + 64


def _bad_input_worker(rank, world_size, case):
    student = torch.randn(4, 10)
    teacher = torch.randn(4, 10)
    top_k, temperature = 3, 1.0
    if case == "top_k on one rank" and rank == 1:
        top_k = -1
    if case == "top_k differs":
        top_k = 3 + rank
    if case == "token counts differ" and rank == 1:
        student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    if case == "integer logits on one rank" and rank == 0:
        student = torch.zeros(4, 10, dtype=torch.long)
    if case == "empty slice" and rank == 1:
        student, teacher = torch.randn(4, 0), torch.randn(4, 0)
    try:
        tail_divergence(student, teacher, top_k=top_k, beta=2.0, temperature=temperature, tp_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("case, named", [
    ("top_k on one rank", "top_k"),
    ("top_k differs", "top_k differs"),
    ("token counts differ", "number of tokens"),
    ("integer logits on one rank", "student_logits"),
    ("empty slice", "empty"),
])
def test_bad_input_on_one_rank_raises_on_every_rank(case, named):
    messages = run_on_ranks(3, _bad_input_worker, case, timeout=60)
    assert all(message is not None for message in messages), messages
    assert any(named in message for message in messages), messages


def test_a_rank_with_bad_input_joins_the_layout_check_on_the_logits_device(monkeypatch):
    """The rank whose argument is bad still sends its row on the logits' device: NCCL would refuse a
    host tensor there, failing that rank alone while the others wait in the check's all-gather.
    The device stands in as ``meta``; the gather is patched to record what it is given."""
    import model_parallel.layout as layout

    sent = []

    def gather(local, group):
        sent.append(local.device)
        return torch.zeros(1, 2, local.shape[1], dtype=local.dtype, device="cpu")  # the other rank: no error

    monkeypatch.setattr(layout, "is_parallel", lambda group: True)
    monkeypatch.setattr(layout, "gather_rows", gather)
    monkeypatch.setattr(layout.dist, "get_backend", lambda group: "gloo")
    teacher = torch.randn(4, 8, device="meta")
    for student, named in ((torch.randn(4, 8, device="cpu"), "different devices"),
                           (torch.zeros(4, 8, dtype=torch.long, device="cpu"), "floating point"),
                           ([[0.0] * 8] * 4, "torch.Tensor")):
        with pytest.raises(ValueError, match=named):
            tail_divergence(student, teacher, top_k=2, beta=1.0, tp_group=object())
    assert sent == [torch.device("meta")] * 3
    # On an NCCL group the check runs on the current CUDA device whatever a caller passed.
    monkeypatch.setattr(layout.dist, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert layout._exchange_device(object(), torch.device("cpu")) == torch.device("cuda", 3)
