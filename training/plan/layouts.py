"""The layouts a plan compares: which can run at all (:func:`layout_problem`), every candidate on a
cluster (:func:`candidate_layouts`), the config's own (:func:`configured_layout`), and the DeepSpeed
JSON values the plan chooses for one (:func:`deepspeed_settings`)."""

import math
from typing import Callable, Dict, List, Optional

from data.loader import global_batch_size
from training.deepspeed_config import resolve_student_stage, stage_problem
from training.plan.inputs import Cluster, Job, Layout


def _one_digit(value: float) -> int:
    """``value`` rounded down to one significant digit (4.6e7 -> 4e7)."""
    scale = 10 ** int(math.floor(math.log10(value)))
    return int(value // scale * scale)


def deepspeed_settings(job: Job, layout: Layout) -> Dict[str, object]:
    """The DeepSpeed JSON values the plan chooses for ``layout`` (dotted keys), as estimates:

    - ``reduce_bucket_size`` (and ZeRO-3's ``stage3_prefetch_bucket_size``): the student's
      parameters per rank over 8, so that a step's gradient reduction and parameter gathers come in
      at least 8 pieces that can overlap with compute, between 5e6 elements (below which a
      collective's latency dominates) and DeepSpeed's 5e8; one significant digit;
    - ``stage3_param_persistence_threshold``: DeepSpeed's 1e5 (tensors below it cost more to gather
      than to keep);
    - ``data_types.grad_accum_dtype``: fp32 under bf16 (the job sets it; 8 mantissa bits lose
      micro-batch contributions otherwise).
    """
    student = job.student.per_rank(layout.tensor_parallel)
    bucket = _one_digit(min(5e8, max(5e6, student / 8)))
    settings = {"zero_optimization.reduce_bucket_size": bucket}
    if layout.student_zero_stage == 3 or layout.teacher_placement == "zero3":
        settings["zero_optimization.stage3_prefetch_bucket_size"] = bucket
        settings["zero_optimization.stage3_param_persistence_threshold"] = 100000
    if job.weight_bytes == 2:
        settings["data_types.grad_accum_dtype"] = "fp32"
    return settings


def layout_problem(job: Job, layout: Layout, cluster: Cluster) -> Optional[str]:
    """Why ``layout`` cannot run ``job`` on ``cluster`` at all (before memory), or None."""
    tp = layout.tensor_parallel
    if cluster.world_size % tp or tp > cluster.gpus_per_node:
        return (f"parallel.tensor_parallel {tp} must divide the {cluster.gpus_per_node} GPUs of a node "
                f"(tensor-parallel groups stay inside a node)")
    for name, model in (("teacher", job.teacher), ("student", job.student)):
        if model is None:
            continue
        for what, count in (("attention heads", model.heads), ("key-value heads", model.kv_heads)):
            if count % tp:
                return f"parallel.tensor_parallel {tp} does not divide the {name}'s {count} {what}"
    problem = stage_problem(layout.student_zero_stage, tensor_parallel=tp, bf16=job.weight_bytes == 2)
    if problem:
        return problem
    dp = cluster.world_size // tp
    if global_batch_size(layout.micro_batch_size, layout.grad_accum, dp) != job.global_batch:
        return (f"train.micro_batch_size {layout.micro_batch_size} x train.grad_accum {layout.grad_accum} x "
                f"{dp} data-parallel ranks is not the global batch of {job.global_batch} sequences")
    return None


def candidate_layouts(job_for_tp: Callable[[int], Job], cluster: Cluster) -> List[Layout]:
    """Every layout at the job's global batch (``job_for_tp(tp)``: the job with its models counted
    at TP ``tp``): TP sizes up to a node, both teacher placements, ZeRO stages 1-3 (and 0 where it
    can run: fp32 at TP 1), micro-batches that divide the batch (grad_accum adjusted),
    checkpointing off and on."""
    layouts = []
    for tp in (size for size in (1, 2, 4, 8, 16) if size <= cluster.gpus_per_node):
        dp = cluster.world_size // tp
        job = job_for_tp(tp)
        per_rank = job.global_batch // dp if job.global_batch % dp == 0 else 0
        micros = [m for m in (1, 2, 4, 8, 16, 32) if per_rank and per_rank % m == 0] or [1]
        placements = ("resident", "zero3") if job.teacher is not None else ("resident",)
        stages = [s for s in (0, 1, 2, 3) if not stage_problem(s, tensor_parallel=tp, bf16=job.weight_bytes == 2)]
        for micro in micros:
            for placement in placements:
                for stage in stages:
                    for checkpointing in (False, True):
                        layouts.append(Layout(tp, placement, stage, micro, max(per_rank // micro, 1), checkpointing))
    return layouts


def configured_layout(cfg) -> Layout:
    """The layout ``cfg`` (a :class:`training.config.RunConfig`) asks for, its student stage resolved."""
    return Layout(cfg.parallel.tensor_parallel, cfg.parallel.teacher_placement, resolve_student_stage(cfg),
                  cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.activation_checkpointing)
