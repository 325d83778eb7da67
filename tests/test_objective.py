"""The job's objective and the global argmax used for agreement."""

import pytest
import torch
import torch.distributed as dist

from loss import cross_entropy, forward_kl, tail_divergence, tail_divergence_parts
from loss.objective import distillation_objective, sequence_beta
from model_parallel import global_argmax
from model_parallel.spawn import run_on_ranks


def _pair(rows=12, vocab=40):
    generator = torch.Generator().manual_seed(3)
    return torch.randn(rows, vocab, generator=generator) * 2, torch.randn(rows, vocab, generator=generator) * 2


def test_sequence_beta_normalises_by_the_sequence_mean_tail_mass():
    mass = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.0, 0.5])
    rows = torch.tensor([0, 0, 1, 2, 2, 1])
    expected = torch.tensor([2 * 0.1 / 0.2, 2 * 0.3 / 0.2, 2 * 0.2 / 0.35, 0.0, 0.0, 2 * 0.5 / 0.35])
    torch.testing.assert_close(sequence_beta(2.0, mass, rows), expected)


def test_objective_combines_kd_and_ce():
    student, teacher = _pair()
    labels = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(4))
    out = distillation_objective(student, teacher, labels, kind="tail", top_k=4, beta=2.0, temperature=2.0,
                                 ce_weight=0.25)
    kd = tail_divergence(student, teacher, top_k=4, beta=2.0, temperature=2.0)
    torch.testing.assert_close(out["loss"], 0.75 * 4.0 * kd + 0.25 * cross_entropy(student, labels))
    rows = torch.arange(12) // 4
    out = distillation_objective(student, teacher, labels, kind="tail", top_k=4, beta=2.0, beta_mode="sequence",
                                 sequence_ids=rows)
    parts = tail_divergence_parts(student, teacher, top_k=4)
    beta = sequence_beta(2.0, parts.teacher_tail_mass, rows)
    torch.testing.assert_close(out["loss"], parts.head_kl + beta * parts.tail_kl)
    out = distillation_objective(student, teacher, labels, kind="kl", top_k=4, beta=2.0)
    torch.testing.assert_close(out["loss"], forward_kl(student, teacher))
    out = distillation_objective(student, None, labels, kind="ce", top_k=4, beta=2.0)
    torch.testing.assert_close(out["loss"], cross_entropy(student, labels))
    with pytest.raises(ValueError, match="loss.kind: unknown 'js'"):
        distillation_objective(student, teacher, labels, kind="js", top_k=4, beta=2.0)


BOUNDS = [17, 23]


def _argmax_worker(rank, world_size):
    _, teacher = _pair()
    teacher[0, 5] = teacher[0, 30] = 100.0  # a tie across slices: id 5 wins
    start = sum(BOUNDS[:rank])
    return global_argmax(teacher[:, start:start + BOUNDS[rank]], start, dist.group.WORLD)


def test_global_argmax_over_slices():
    _, teacher = _pair()
    teacher[0, 5] = teacher[0, 30] = 100.0
    expected = teacher.argmax(dim=-1)
    assert expected[0] == 5
    for result in run_on_ranks(2, _argmax_worker):
        assert torch.equal(result, expected)
    assert torch.equal(global_argmax(teacher, 0, None), expected)


def test_a_divergence_is_one_registry_entry(monkeypatch, tmp_path):
    """An entry in loss.registry.LOSSES is all the objective and the run config need."""
    from loss.registry import LOSSES, Divergence
    from training.config import load_config

    def half_kl(student, teacher, *, top_k, beta_for, temperature, tp_group, shard, donate_teacher):
        return {"kd": 0.5 * forward_kl(student, teacher, temperature=temperature, tp_group=tp_group)}

    monkeypatch.setitem(LOSSES, "half_kl", Divergence("half_kl", "half the forward KL", half_kl))
    student, teacher = _pair()
    labels = torch.zeros(12, dtype=torch.long)
    out = distillation_objective(student, teacher, labels, kind="half_kl", top_k=0, beta=0.0, temperature=2.0)
    torch.testing.assert_close(out["loss"], 4.0 * 0.5 * forward_kl(student, teacher, temperature=2.0))
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\nteacher: {path: t}\nstudent: {config: s.json}\ndata: {train: d}\n"
                      "loss: {kind: half_kl}\nparallel: {deepspeed_config: ds.json}\n")
    assert load_config(str(config)).loss.kind == "half_kl"
