"""``parallel.student_zero_stage: auto``: the student's ZeRO stage the job takes, decided before it starts.

In order: the DeepSpeed JSON's ``zero_optimization.stage`` where it sets one (the JSON rules, as
for any value); on a resume, the checkpoint's stage (a ZeRO checkpoint resumes at its own stage
only); else the stage the planner (:mod:`training.plan`) estimates fastest for the job's own layout
(tensor-parallel size, teacher placement, micro-batch, accumulation, checkpointing) among those that
can run it (:func:`training.deepspeed_config.stage_problem`) and fit in memory, with the fixed
per-step costs of the device type (:data:`training.plan.timing.FIXED_COSTS`). Where the planner
cannot plan the job (a model it cannot shape offline) or nothing fits, stage 3, as where the key is
absent. The job prints the choice in one line (:func:`resolve_auto_stage`).
"""

import dataclasses
from typing import Optional, Tuple

import torch

from core.errors import ConfigError
from model_parallel.distributed import decided_on_rank_0
from training.checkpoint import find_resume, read_client_state
from training.config import RunConfig
from training.deepspeed_config import AUTO, read_deepspeed_json, stage_problem
from training.plan import UnknownArchitecture, fastest_stage, job_cluster, job_from_config
from training.plan.layouts import configured_layout
from training.resume import checkpoints_dir

FALLBACK_STAGE = 3


def _saved_stage(cfg: RunConfig) -> Optional[int]:
    """The ZeRO stage of the checkpoint this run would resume, or None when it starts fresh
    (``training.resume.plan_resume`` then verifies and loads the same one). Quiet: its warnings
    are printed once, there."""
    found = find_resume(cfg.checkpoint.resume, checkpoints_dir(cfg),
                        fallback=cfg.checkpoint.fallback, warn=lambda message: None)
    if found is None:
        return None
    return read_client_state(*found)["layout"].get("zero_stage", 3)


def planned_stage(cfg: RunConfig, *, world_size: int, bf16: bool, device) -> Tuple[int, str]:
    """The planner's fastest stage that can run and fits ``cfg``'s own layout on ``world_size``
    ranks of ``device``'s type, and why (the estimates, in words); ``FALLBACK_STAGE`` where it
    cannot plan or nothing fits."""
    device_type = torch.device(device).type
    stages = [s for s in (0, 1, 2, 3) if not stage_problem(s, tensor_parallel=cfg.parallel.tensor_parallel, bf16=bf16)]
    try:
        job = job_from_config(cfg, world_size=world_size, bf16=bf16)
        layout = configured_layout(cfg)
        cluster = job_cluster(world_size, device)
        best = fastest_stage(job, layout, cluster, stages, device_type=device_type)
    except (ConfigError, UnknownArchitecture, OSError) as error:
        return FALLBACK_STAGE, f"the planner cannot plan this job ({str(error).splitlines()[0]})"
    if best is None:
        return FALLBACK_STAGE, f"no stage of {stages} fits in the planner's memory estimate"
    times = ", ".join(f"ZeRO-{e.layout.student_zero_stage} {e.step_time_s * 1e3:.3g} ms"
                      for e in (fastest_stage(job, layout, cluster, [s], device_type=device_type) for s in stages)
                      if e is not None)
    return best.layout.student_zero_stage, f"planned fastest that fits on {device_type} (estimates per step: {times})"


def _decide(cfg: RunConfig, world_size: int, bf16: bool, device) -> Tuple[int, str]:
    json_stage = read_deepspeed_json(cfg.parallel.deepspeed_config).get("zero_optimization", {}).get("stage", AUTO)
    if json_stage != AUTO:
        return json_stage, f"{cfg.parallel.deepspeed_config} sets zero_optimization.stage"
    saved = _saved_stage(cfg)
    if saved is not None:
        return saved, "the stage of the checkpoint this run resumes"
    return planned_stage(cfg, world_size=world_size, bf16=bf16, device=device)


def resolve_auto_stage(cfg: RunConfig, *, world_size: int, bf16: bool, device) -> Tuple[RunConfig, Optional[str]]:
    """``cfg`` with ``parallel.student_zero_stage: auto`` replaced by the stage the job takes (see
    the module), and the line that says so; ``cfg`` itself and None where it is not ``auto``.
    Collective (rank 0 decides, once); the chosen stage still goes through the JSON's and the
    stage rules' checks (``training.deepspeed_config``), which refuse it by name."""
    if cfg.parallel.student_zero_stage != AUTO:
        return cfg, None
    stage, why = decided_on_rank_0("choosing the student's ZeRO stage (parallel.student_zero_stage: auto)",
                                   lambda: _decide(cfg, world_size, bf16, device))
    resolved = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, student_zero_stage=stage))
    return resolved, f"parallel.student_zero_stage: auto -> {stage} ({why})"
