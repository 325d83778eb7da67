"""The distillation job: build, resume, train, checkpoint, log, evaluate, export."""

import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml

from core.errors import ConfigError, TrainingStopped
from data.loader import Collator, GlobalBatchSampler, eval_batches, load_prepared
from data.manifest import read_manifest
from model_parallel import all_reduce_sum
from model_parallel.distributed import accelerator_device
from training import checkpoint, faults, on_policy, resume
from training.auto_stage import resolve_auto_stage
from training.config import RunConfig, to_dict
from training.data import ensure_prepared
from training.deepspeed_config import build_deepspeed_configs, resolve_student_stage
from training.engines import build_engines, engine_sources, use_bf16
from training.export import export_student
from training.memory import PeakMemory
from training.metrics_log import MetricsWriter
from training.plan import UnknownArchitecture, describe, job_plan
from training.step import evaluate, step_means, train_step


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _eval_scalars(engines, cfg, eval_set, collator, step) -> dict:
    """Evaluate on (up to ``eval.max_batches`` per rank of) the eval split; rank 0 also writes the
    calibration bins to ``output_dir/eval_bins.json`` for reliability diagrams."""
    batches = eval_batches(eval_set, batch_size=cfg.train.micro_batch_size, dp_size=engines.dp_size,
                           dp_rank=engines.dp_rank, collator=collator)
    if cfg.eval.max_batches:
        batches = (batch for _, batch in zip(range(cfg.eval.max_batches), batches))
    scalars, bins = evaluate(engines, cfg.loss, batches)
    if dist.get_rank() == 0:
        with open(os.path.join(cfg.output_dir, "eval_bins.json"), "w") as out:
            json.dump({"step": step, **bins}, out)
    return {f"eval/{name}": value for name, value in scalars.items() if name != "tokens"}


def _planned_peak_gb(cfg: RunConfig, world_size: int, bf16: bool) -> float:
    """Print the plan of this layout (rank 0) and return its peak memory per GPU in GB (an estimate;
    NaN where the planner cannot plan it: see ``job_plan``'s errors). Any other error is a bug in
    the planner and propagates."""
    try:
        result = job_plan(cfg, world_size=world_size, bf16=bf16, device=accelerator_device())
    # The plan informs; it never stops a job that can run. What it cannot plan by design: a config it
    # refuses, a model it cannot shape offline (e.g. remote code; a ConfigError too), a file it cannot read.
    except (ConfigError, UnknownArchitecture, OSError) as error:
        if dist.get_rank() == 0:
            print(f"plan: not available ({type(error).__name__}: {str(error).splitlines()[0]})", file=sys.stderr)
        return float("nan")
    if dist.get_rank() == 0:
        print("\n".join(describe(result, world_note=f"; this job: {world_size} rank(s)")), file=sys.stderr)
    return result.shown.peak_memory_bytes / 1e9


def _generation_scalars(generation, engines) -> dict:
    """An on-policy logging step's ``gen/`` scalars, over the data-parallel group: the generation's
    seconds, the mean continuation length (tokens up to and including EOS) and the share that
    wrote an EOS within ``max_new_tokens``."""
    sums = torch.stack([generation.lengths, generation.eos,
                        torch.tensor(float(generation.sequences), dtype=torch.float64, device=engines.device)])
    lengths, eos, sequences = all_reduce_sum(sums, engines.dp_group).tolist()  # host sync: the logged values
    return {"gen/seconds": generation.seconds, "gen/mean_length": lengths / max(sequences, 1.0),
            "gen/eos_fraction": eos / max(sequences, 1.0)}


def _step_scalars(result, seconds: float, engines, memory: PeakMemory) -> dict:
    """A logging step's scalars (host syncs: the step's sums are reduced and read back here)."""
    means = step_means(result, engines)
    scalars = {f"train/{name}": value for name, value in means.items() if name != "tokens"}
    scalars["train/tokens_per_s"] = means["tokens"] / seconds
    scalars["train/skipped_steps"] = engines.student.skipped_steps
    scalars["train/peak_memory_gb"] = memory.read_gb()
    return scalars


class _SkipGuard:
    """Counts consecutive skipped (non-finite) steps: warns on each, stops past the limit."""

    def __init__(self, limit: int):
        self.limit, self.consecutive = limit, 0

    def check(self, step: int, result) -> None:
        self.consecutive = self.consecutive + 1 if result.skipped else 0
        if not result.skipped:
            return
        ranks = result.non_finite_ranks
        where = f"non-finite loss on rank(s) {ranks}" if ranks else "non-finite gradients"
        if dist.get_rank() == 0:
            print(f"warning: step {step} skipped ({where}); parameters unchanged", file=sys.stderr)
        if self.consecutive > self.limit:
            raise TrainingStopped(f"step {step}: {self.consecutive} consecutive steps skipped ({where}); stopping "
                                  f"(train.max_consecutive_skips={self.limit})")


def _write_resolved_config(cfg: RunConfig) -> None:
    if dist.get_rank() == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as out:
            yaml.safe_dump(to_dict(cfg), out, sort_keys=False)


def run(cfg: RunConfig) -> dict:
    """Train as configured; returns the last logged scalars (every rank)."""
    from tqdm import tqdm

    world_size, bf16 = dist.get_world_size(), use_bf16(cfg.train.dtype)
    train_dir = ensure_prepared(cfg, cfg.data.train, "train")
    train_manifest = read_manifest(train_dir)
    on_policy.check_data(cfg.on_policy, train_manifest)
    eval_dir = ensure_prepared(cfg, cfg.data.eval, "eval") if cfg.data.eval else None
    # parallel.student_zero_stage: auto becomes a stage here, once, before anything reads it.
    cfg, stage_line = resolve_auto_stage(cfg, world_size=world_size, bf16=bf16, device=accelerator_device())
    if stage_line and dist.get_rank() == 0:
        print(stage_line, file=sys.stderr)
    # Before any model is built, so a bad checkpoint fails fast.
    plan = resume.plan_resume(cfg, world_size, resolve_student_stage(cfg))
    planned_gb = _planned_peak_gb(cfg, world_size, bf16)
    _seed_everything(cfg.seed)
    memory = PeakMemory(accelerator_device())
    engines = build_engines(**engine_sources(cfg), bf16=bf16,
                            ds_configs=build_deepspeed_configs(cfg, world_size, bf16, universal=plan.universal))
    faults.install(engines)
    train_set, _ = load_prepared(train_dir, engines.tokenizer, key="data")
    eval_set = load_prepared(eval_dir, engines.tokenizer, key="data")[0] if eval_dir else None
    plan.restore(engines.student)
    sampler = GlobalBatchSampler(len(train_set), micro_batch_size=cfg.train.micro_batch_size,
                                 grad_accum=cfg.train.grad_accum, dp_size=engines.dp_size, dp_rank=engines.dp_rank,
                                 seed=cfg.seed, consumed_samples=plan.consumed_samples)
    collator = Collator(engines.tokenizer.pad_token_id)
    _write_resolved_config(cfg)
    writer = MetricsWriter(cfg.output_dir, resume_step=plan.step, enabled=dist.get_rank() == 0)
    step, end = plan.step, cfg.train.stop_at_step or cfg.train.max_steps
    skips, scalars = _SkipGuard(cfg.train.max_consecutive_skips), {}
    progress = tqdm(total=cfg.train.max_steps, initial=step, desc="distill", unit="step",
                    disable=dist.get_rank() != 0, dynamic_ncols=True)
    while step < end:
        step += 1
        indices = sampler.step_micro_batches()
        micro_batches = [collator([train_set[int(i)] for i in rows]) for rows in indices]
        evaluate_now = eval_set is not None and (step == cfg.train.max_steps or
                                                 (cfg.eval.every and step % cfg.eval.every == 0))
        log_now = evaluate_now or step % cfg.logging.every == 0 or step == end
        started, generation = time.perf_counter(), None
        if on_policy.is_on_policy(cfg.seed, step, cfg.on_policy.fraction):
            generation = on_policy.generate_micro_batches(engines, cfg, micro_batches, indices, step,
                                                          sft=train_manifest.get("format") == "sft",
                                                          seq_len=int(train_manifest["seq_len"]), timed=log_now)
            micro_batches = generation.micro_batches
        result = train_step(engines, cfg.loss, micro_batches)  # ends with DeepSpeed's host-side step decision
        seconds = time.perf_counter() - started
        faults.point(f"step {step}")
        skips.check(step, result)
        if log_now:
            scalars = _step_scalars(result, seconds, engines, memory)
            scalars["train/planned_peak_memory_gb"] = planned_gb
            if cfg.on_policy.fraction > 0:
                scalars["train/on_policy"] = float(generation is not None)
            if generation is not None:
                scalars.update(_generation_scalars(generation, engines))
            if evaluate_now:
                scalars.update(_eval_scalars(engines, cfg, eval_set, collator, step))
            writer.log(step, scalars)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4f}")
        progress.update(1)
        if step % cfg.checkpoint.every == 0 or step == end:
            checkpoint.save(engines.student, resume.checkpoints_dir(cfg), step,
                            resume.client_state(cfg, step, sampler, engines), cfg.checkpoint.keep)
    progress.close()
    if step == cfg.train.max_steps:
        export_student(engines.student, engines.tokenizer, os.path.join(cfg.output_dir, "student"))
    writer.close()
    return scalars


__all__ = ["run"]
