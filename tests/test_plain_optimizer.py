"""training.plain_optimizer: the student's AdamW at ZeRO stage 0, inside a real DeepSpeed engine on
2 gloo ranks, against torch's own clip and AdamW applied by hand to the ranks' averaged gradients."""

import copy

import pytest
import torch

from model_parallel.spawn import run_on_ranks
from training.plain_optimizer import plain_data_parallel

MAX_NORM, LR, WEIGHT_DECAY = 0.5, 0.1, 0.01


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _inputs(rank):
    return torch.arange(4, dtype=torch.float32).view(1, 4) * (rank + 1) / 4


def _config():
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
            "gradient_clipping": MAX_NORM, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}}}


def _engine_steps(rank, world_size):
    import deepspeed

    config, optimizer = plain_data_parallel(_config())
    model = _model()
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=optimizer,
                                      model_parameters=list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    lr_before = engine.get_lr()[0]
    # Step 1: rank 1's loss is NaN; the all-reduce spreads it, so every rank skips.
    loss = engine(_inputs(rank)).sum() * (float("nan") if rank == 1 else 1.0)
    engine.backward(loss)
    engine.step()
    skipped = {"applied": engine.was_step_applied(), "skipped_steps": engine.skipped_steps,
               "unchanged": all(torch.equal(a, p) for a, p in zip(before, model.parameters())),
               "lr_kept": engine.get_lr()[0] == lr_before}
    # Step 2: finite.
    lr = engine.get_lr()[0]
    engine.backward(engine(_inputs(rank)).sum())
    engine.step()
    return {"skipped": skipped, "applied": engine.was_step_applied(), "lr": lr,
            "norm": float(engine.get_global_grad_norm()), "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.e2e
def test_stage_0_clips_reports_the_norm_and_skips_a_non_finite_step():
    results = run_on_ranks(2, _engine_steps, deepspeed=True, timeout=300)
    for result in results:
        assert result["skipped"] == {"applied": False, "skipped_steps": 1, "unchanged": True, "lr_kept": True}
        assert result["applied"]
    # The reference: each rank's gradient, averaged, clipped by torch, one torch AdamW step.
    reference = _model()
    grads = []
    for rank in range(2):
        model = copy.deepcopy(reference)
        model(_inputs(rank)).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    averaged = [(a + b) / 2 for a, b in zip(*grads)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in averaged)).item()
    assert norm > MAX_NORM  # the clip is exercised
    for result in results:
        assert result["norm"] == pytest.approx(norm, rel=1e-6)  # the pre-clip norm
    optimizer = torch.optim.AdamW(reference.parameters(), lr=results[0]["lr"], weight_decay=WEIGHT_DECAY)
    for p, g in zip(reference.parameters(), averaged):
        p.grad = g * (MAX_NORM / (norm + 1e-6))
    optimizer.step()
    for result in results:
        for got, want in zip(result["params"], reference.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)


def test_the_split_keeps_the_adamw_parameters_and_moves_the_clip():
    config, build = plain_data_parallel(_config())
    assert "optimizer" not in config and config["gradient_clipping"] == 0.0  # DeepSpeed neither builds nor clips
    assert config["scheduler"] == _config()["scheduler"]
    optimizer = build(_model().parameters())
    assert optimizer.max_norm == MAX_NORM
    assert optimizer.defaults["lr"] == LR and optimizer.defaults["weight_decay"] == WEIGHT_DECAY
    with pytest.raises(ValueError, match="must be AdamW, got 'Lamb'"):
        plain_data_parallel({**_config(), "optimizer": {"type": "Lamb"}})
