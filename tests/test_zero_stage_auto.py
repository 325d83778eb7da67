"""``parallel.student_zero_stage: auto`` and the fixed per-step costs the planner chooses it by.

The choice itself (which stage a benchmark measures fastest) takes minutes of training to observe;
here: the cost model's counted terms against what the code does (GuardedAdamW's ops, counted by
torch's dispatcher), that ``auto`` resolves to the planner's fastest stage and says so in one
line, that the DeepSpeed JSON's stage and a resumed checkpoint's stage win, and that a stage the
rules refuse is refused by name."""

import collections
import json
import os
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from core.errors import ConfigError
from training import auto_stage
from training.config import load_config
from training.deepspeed_config import build_deepspeed_configs
from training.plain_optimizer import plain_data_parallel
from training.plan import Cluster, fastest_stage, fixed_events, fixed_seconds, job_cluster, job_from_config
from training.plan.layouts import configured_layout
from training.plan.timing import FLAT_STEP_OPS, STAGE0_OPS_PER_TENSOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(*overrides):
    """The demo distillation config with a CE loss (no teacher to shape), TP 1, in fp32."""
    return load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"),
                       ["loss.kind=ce", "parallel.tensor_parallel=1", "train.dtype=fp32", *overrides])


@pytest.fixture
def on_rank_0(monkeypatch):
    """The job's collective decision as rank 0 of one rank decides it (no process group)."""
    monkeypatch.setattr(auto_stage, "decided_on_rank_0", lambda what, decide, **_: decide())
    monkeypatch.chdir(ROOT)


class _CountOps(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _guarded_step_ops(tensors: int) -> int:
    """Dispatched ops of the second step of the job's stage-0 optimizer on ``tensors`` parameters."""
    config = build_deepspeed_configs(_config("parallel.student_zero_stage=0"), world_size=2, bf16=False).student
    _, make_optimizer = plain_data_parallel(config)
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(tensors)]
    optimizer = make_optimizer(params)
    for _ in range(2):
        for param in params:
            param.grad = torch.randn_like(param)
        with _CountOps() as counted:
            optimizer.step()
    return sum(counted.ops.values())


def test_the_stage_0_optimizer_step_is_multi_tensor_on_cpu(monkeypatch):
    """torch's AdamW on CPU loops over the tensors in Python (about ten ops each) unless fused; the
    job asks for the fused kernel there too, so GuardedAdamW's norm, clip and update do not grow
    with the tensor count: the planner's stage-0 ops per tensor are DeepSpeed's unflatten only."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = build_deepspeed_configs(_config("parallel.student_zero_stage=0"), world_size=2, bf16=False).student
    assert config["optimizer"]["params"]["fused"] is True
    few, many = _guarded_step_ops(4), _guarded_step_ops(32)
    assert few == many and few <= FLAT_STEP_OPS + 10


def test_deepspeed_throughput_timer_is_off_unless_the_json_turns_it_on(tmp_path):
    """Its synchronised timer waits for the device twice per micro-batch; nothing here reads it."""
    configs = build_deepspeed_configs(_config(), world_size=2, bf16=False)
    for ds in (configs.student, configs.teacher, configs.frozen):
        assert ds["timers"]["throughput"]["enabled"] is False
    ds = json.load(open(os.path.join(ROOT, "ds_configs/zero3_tp.json")))
    ds["timers"] = {"throughput": {"enabled": True}}
    path = tmp_path / "timed.json"
    path.write_text(json.dumps(ds))
    student = build_deepspeed_configs(_config(f"parallel.deepspeed_config={path}"), world_size=2, bf16=False).student
    assert student["timers"]["throughput"]["enabled"] is True


def _job(*overrides):
    cfg = _config(*overrides)
    return job_from_config(cfg, world_size=2, bf16=False), configured_layout(cfg)


def test_fixed_events_count_what_each_stage_does():
    """Per step: stage 0 one all-reduce and ops per parameter tensor; stages 1 and 2 the same at one
    micro-batch, stage 2's reduces repeat per micro-batch; stage 3 gathers every module above the
    persistence threshold twice per micro-batch and runs four hooks per module."""
    job, layout = _job("train.grad_accum=1")
    cluster = Cluster(nodes=1, gpus_per_node=2)
    tensors = len(job.student.tensors)
    events = {stage: fixed_events(job, replace(layout, student_zero_stage=stage), cluster) for stage in range(4)}
    assert events[0]["collectives"] == 1 + 1  # the gradients' all-reduce, the global token count
    assert events[0]["ops"] == STAGE0_OPS_PER_TENSOR * tensors + FLAT_STEP_OPS
    assert events[1] == events[2]
    accumulating = replace(layout, student_zero_stage=2, grad_accum=4)
    assert fixed_events(job, accumulating, cluster)["collectives"] == events[2]["collectives"] + 3
    assert events[3]["hooks"] > 0 == events[1]["hooks"]
    # Stage 3 without persistent tensors: a gather per tensor in forward and in backward, one
    # reduce-scatter, the norm's all-reduce and the token count; with them (the demo student's are
    # all under 1e5 elements), one gather per persistent tensor after the step instead.
    gathering = replace(job, ds={**job.ds, "stage3_param_persistence_threshold": 0})
    stage3 = replace(layout, student_zero_stage=3)
    assert fixed_events(gathering, stage3, cluster)["collectives"] == 2 * tensors + 1 + 1 + 1
    assert fixed_events(job, stage3, cluster)["collectives"] == tensors + 1 + 1 + 1
    for stage in range(4):
        assert fixed_seconds(job, replace(layout, student_zero_stage=stage), cluster, "cpu") > \
            fixed_seconds(job, replace(layout, student_zero_stage=stage), cluster, "cuda")


def test_fastest_stage_breaks_ties_to_the_lower_stage_and_skips_what_does_not_fit():
    job, layout = _job()
    cluster = Cluster(nodes=1, gpus_per_node=2)
    best = fastest_stage(job, layout, cluster, [1, 2], device_type="cuda")
    assert best.layout.student_zero_stage == 1  # the same events and bytes at one micro-batch
    assert fastest_stage(job, layout, replace(cluster, gpu_memory_gb=1e-6), [0, 1, 2, 3]) is None
    with pytest.raises(ValueError, match="no fixed costs for device type 'mps'"):
        fastest_stage(job, layout, cluster, [1], device_type="mps")


def test_auto_resolves_to_the_planned_fastest_stage_and_says_so(on_rank_0):
    cfg = _config("parallel.student_zero_stage=auto", "output_dir=/nonexistent/run")
    resolved, line = auto_stage.resolve_auto_stage(cfg, world_size=2, bf16=False, device="cpu")
    job = job_from_config(cfg, world_size=2, bf16=False)
    expected = fastest_stage(job, configured_layout(cfg), job_cluster(2, "cpu"), [0, 1, 2, 3], device_type="cpu")
    assert resolved.parallel.student_zero_stage == expected.layout.student_zero_stage
    assert line.startswith(f"parallel.student_zero_stage: auto -> {expected.layout.student_zero_stage} (planned "
                           f"fastest that fits on cpu") and "\n" not in line
    assert build_deepspeed_configs(resolved, world_size=2, bf16=False).student_stage == \
        expected.layout.student_zero_stage
    assert auto_stage.resolve_auto_stage(_config("parallel.student_zero_stage=1"), world_size=2, bf16=False,
                                         device="cpu") == (_config("parallel.student_zero_stage=1"), None)


def test_auto_never_plans_a_stage_the_rules_refuse(on_rank_0):
    """At TP 2 (or in bf16) stage 0 cannot run: the planner picks among 1-3."""
    for overrides in (["parallel.tensor_parallel=2"], ["train.dtype=bf16"]):
        cfg = _config("parallel.student_zero_stage=auto", *overrides)
        stage, _ = auto_stage.planned_stage(cfg, world_size=2, bf16="train.dtype=bf16" in overrides, device="cpu")
        assert stage in (1, 2, 3)


def test_the_json_stage_and_a_resumed_checkpoint_stage_win(on_rank_0, tmp_path, monkeypatch):
    ds = json.load(open(os.path.join(ROOT, "ds_configs/zero3_tp.json")))
    ds["zero_optimization"]["stage"] = 2
    path = tmp_path / "stage2.json"
    path.write_text(json.dumps(ds))
    cfg = _config("parallel.student_zero_stage=auto", f"parallel.deepspeed_config={path}")
    resolved, line = auto_stage.resolve_auto_stage(cfg, world_size=2, bf16=False, device="cpu")
    assert resolved.parallel.student_zero_stage == 2 and f"{path} sets zero_optimization.stage" in line

    tag = tmp_path / "run" / "checkpoints" / "step_4"
    tag.mkdir(parents=True)
    (tag / "client_state.json").write_text(json.dumps({"layout": {"zero_stage": 3}}))
    monkeypatch.setattr(auto_stage, "find_resume", lambda resume, root, **_: (root, "step_4"))
    cfg = _config("parallel.student_zero_stage=auto", f"output_dir={tmp_path / 'run'}")
    resolved, line = auto_stage.resolve_auto_stage(cfg, world_size=2, bf16=False, device="cpu")
    assert resolved.parallel.student_zero_stage == 3 and "the checkpoint this run resumes" in line


def test_a_resumed_stage_the_rules_refuse_is_refused_by_name(on_rank_0, tmp_path, monkeypatch):
    """A ZeRO-0 checkpoint resumed at TP 2: the stage rules' refusal, naming the key."""
    tag = tmp_path / "run" / "checkpoints" / "step_4"
    tag.mkdir(parents=True)
    (tag / "client_state.json").write_text(json.dumps({"layout": {"zero_stage": 0}}))
    monkeypatch.setattr(auto_stage, "find_resume", lambda resume, root, **_: (root, "step_4"))
    cfg = _config("parallel.student_zero_stage=auto", "parallel.tensor_parallel=2", f"output_dir={tmp_path / 'run'}")
    resolved, _ = auto_stage.resolve_auto_stage(cfg, world_size=2, bf16=False, device="cpu")
    with pytest.raises(ConfigError, match="parallel.student_zero_stage / .*needs parallel.tensor_parallel 1"):
        build_deepspeed_configs(resolved, world_size=2, bf16=False)


def test_the_config_key_takes_auto():
    assert _config("parallel.student_zero_stage=auto").parallel.student_zero_stage == "auto"
    with pytest.raises(ConfigError, match="parallel.student_zero_stage: must be 0, 1, 2, 3 or auto, got 4"):
        _config("parallel.student_zero_stage=4")
    # Unresolved (a caller that builds engines without the job): as if absent.
    assert build_deepspeed_configs(_config("parallel.student_zero_stage=auto"), world_size=2,
                                   bf16=False).student_stage == 3


def _counted_step_rank(rank, world_size):
    """Each rank: the demo student as the job builds its DeepSpeed engine at stages 0-3 (TP 1, one
    micro-batch), two warm-up steps (ZeRO-3 records and checks its module trace across ranks over
    the first two), then the collectives of one step, counted by comm_counter."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from model_parallel.testing.comm_counter import count_collective_bytes

    counts = {}
    for stage in range(4):
        cfg = _config(f"parallel.student_zero_stage={stage}", "train.micro_batch_size=2", "train.grad_accum=1")
        config = build_deepspeed_configs(cfg, world_size=world_size, bf16=False).student
        config.pop("tensor_parallel")  # TP 1: no AutoTP
        optimizer = None
        if stage == 0:
            config, optimizer = plain_data_parallel(config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            os.path.join(ROOT, "launch/configs/models/demo_student.json")))
        engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=optimizer,
                                          model_parameters=list(model.parameters()))
        ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(rank))
        for step in range(3):
            with count_collective_bytes() as counted:
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
        counts[stage] = dict(counted.calls)
        engine.destroy()
    return counts


@pytest.mark.e2e
def test_zero_collectives_per_step_are_the_counted_ones():
    """The planner's ZeRO collectives per step (:func:`training.plan.timing.fixed_events` less the
    job's token count) against DeepSpeed's own calls on 2 ranks, for stages 0-3."""
    from model_parallel.spawn import run_on_ranks
    from training.plan.timing import _zero_collectives

    counted = run_on_ranks(2, _counted_step_rank, deepspeed=True, timeout=600)[0]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        job, layout = _job("train.micro_batch_size=2", "train.grad_accum=1")
    finally:
        os.chdir(cwd)
    cluster = Cluster(nodes=1, gpus_per_node=2)
    planned = {stage: _zero_collectives(job, replace(layout, student_zero_stage=stage), cluster) for stage in range(4)}
    assert {stage: sum(calls.values()) for stage, calls in counted.items()} == planned, counted
