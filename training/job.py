"""The distillation job: build, resume, train, checkpoint, log, evaluate, export."""

import json
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import yaml

from data.loader import Collator, GlobalBatchSampler, eval_batches, load_prepared
from training import checkpoint, universal
from core.errors import CheckpointError, TrainingStopped, UserError
from training.config import RunConfig, identity, to_dict
from training.data import ensure_prepared
from training.deepspeed_config import build_deepspeed_configs
from training.engines import build_engines
from training.export import export_student
from training.metrics import MetricsWriter
from training.step import evaluate, step_means, train_step


def use_bf16(cfg: RunConfig) -> bool:
    if cfg.train.dtype != "auto":
        return cfg.train.dtype == "bf16"
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _client_state(cfg, step, sampler, engines) -> dict:
    return {
        "step": step,
        "sampler": sampler.state_dict(),
        "run_identity": identity(cfg),
        "layout": {"tensor_parallel": cfg.parallel.tensor_parallel, "data_parallel": engines.dp_size,
                   "global_batch_size": sampler.global_batch_size, "vocab_size": engines.vocab_size,
                   "world_size": dist.get_world_size(), "bf16": engines.student.bfloat16_enabled()},
    }


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


def _decided_on_rank_0(what: str, decide):
    """Rank 0 runs ``decide()`` (a file-system decision worth making once); every rank
    returns its answer or raises the same :class:`UserError`. An unexpected error on rank 0
    is reported too (as a :class:`CheckpointError`), so the other ranks never wait for an answer
    that will not come."""
    answer = [None, None, None]
    if dist.get_rank() == 0:
        try:
            answer[0] = decide()
        except UserError as error:
            answer[1:] = [type(error), str(error)]
        except Exception as error:  # noqa: BLE001 -- see the docstring
            traceback.print_exc()
            answer[1:] = [CheckpointError, f"{what} failed: {error!r}"]
    dist.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise answer[1](answer[2])
    return answer[0]


def _layout_changed(cfg: RunConfig, tag: str, layout: dict, world_size: int) -> bool:
    """Whether ``tag`` was written at another TP x DP layout; refuses a changed global batch."""
    tp = cfg.parallel.tensor_parallel
    dp = world_size // tp
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    if global_batch != layout["global_batch_size"] and not cfg.checkpoint.allow_batch_change:
        raise CheckpointError(f"train: checkpoint {tag} was trained with a global batch of "
                          f"{layout['global_batch_size']} sequences, this run has {global_batch} "
                          f"(micro_batch_size x grad_accum x data-parallel {dp}); adjust train.grad_accum or "
                          f"--set checkpoint.allow_batch_change=true")
    return (layout["tensor_parallel"], layout["data_parallel"]) != (tp, dp)


def run(cfg: RunConfig) -> dict:
    """Train as configured; returns the last logged scalars (every rank)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    bf16 = use_bf16(cfg)
    ds_configs = build_deepspeed_configs(cfg, world_size, bf16)
    train_dir = ensure_prepared(cfg, cfg.data.train, "train")
    eval_dir = ensure_prepared(cfg, cfg.data.eval, "eval") if cfg.data.eval else None
    root = os.path.join(cfg.output_dir, "checkpoints")
    # Before any model is built, so a bad checkpoint fails fast; rank 0 hashes it once.
    resume = _decided_on_rank_0("finding the checkpoint to resume", lambda: checkpoint.find_resume(
        cfg.checkpoint.resume, root, fallback=cfg.checkpoint.fallback))
    if resume:
        state = checkpoint.client_state(*resume)
        rng = checkpoint.read_rng_state(*resume, rank)
        allowed = [key.strip() for key in cfg.checkpoint.allow_config_change.split(",") if key.strip()]
        checkpoint.refuse_drift(state["run_identity"], identity(cfg), resume[1], allowed)
        if _layout_changed(cfg, resume[1], state["layout"], world_size):
            # Another TP x DP layout: DeepSpeed's universal checkpoint re-partitions every tensor.
            converted = _decided_on_rank_0(f"checkpoint {resume[1]}: conversion to the universal format",
                                           lambda: universal.convert(*resume))
            resume = resume[0], converted
            ds_configs[0].setdefault("checkpoint", {})["load_universal"] = True
    _seed_everything(cfg.seed)
    engines = build_engines(cfg, ds_configs, bf16=bf16)
    train_set, _ = load_prepared(train_dir, engines.tokenizer, key="data")
    eval_set = load_prepared(eval_dir, engines.tokenizer, key="data")[0] if eval_dir else None

    step, consumed = 0, 0
    if resume:
        checkpoint.load(engines.student, *resume)
        checkpoint.set_rng_state(rng)
        step, consumed = state["step"], state["sampler"]["consumed_samples"]
    sampler = GlobalBatchSampler(len(train_set), micro_batch_size=cfg.train.micro_batch_size,
                                 grad_accum=cfg.train.grad_accum, dp_size=engines.dp_size, dp_rank=engines.dp_rank,
                                 seed=cfg.seed, consumed_samples=consumed)
    collator = Collator(engines.tokenizer.pad_token_id)
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as out:
            yaml.safe_dump(to_dict(cfg), out, sort_keys=False)
    writer = MetricsWriter(cfg.output_dir, resume_step=step, enabled=rank == 0)

    from tqdm import tqdm

    end = cfg.train.stop_at_step or cfg.train.max_steps
    progress = tqdm(total=cfg.train.max_steps, initial=step, desc="distill", unit="step", disable=rank != 0,
                    dynamic_ncols=True)
    scalars = {}
    consecutive_skips = 0
    while step < end:
        step += 1
        micro_batches = [collator([train_set[int(i)] for i in indices]) for indices in sampler.step_micro_batches()]
        started = time.perf_counter()
        result = train_step(engines, cfg.loss, micro_batches)  # ends with its host sync: timing is real
        checkpoint.pause_for_tests("DISTILL_TEST_STEP_DELAY_S")
        seconds = time.perf_counter() - started
        consecutive_skips = consecutive_skips + 1 if result.skipped else 0
        where = f"non-finite loss on rank(s) {result.non_finite_ranks}" if result.non_finite_ranks else \
            "non-finite gradients"
        if result.skipped and rank == 0:
            print(f"warning: step {step} skipped ({where}); parameters unchanged", file=sys.stderr)
        if consecutive_skips > cfg.train.max_consecutive_skips:
            raise TrainingStopped(f"step {step}: {consecutive_skips} consecutive steps skipped ({where}); stopping "
                                  f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips})")
        evaluate_now = eval_set is not None and (step == cfg.train.max_steps or
                                                 (cfg.eval.every and step % cfg.eval.every == 0))
        if evaluate_now or step % cfg.logging.every == 0 or step == end:
            # Logging steps only: the step's sums are reduced and read back here (host syncs).
            means = step_means(result, engines)
            scalars = {f"train/{name}": value for name, value in means.items() if name != "tokens"}
            scalars["train/tokens_per_s"] = means["tokens"] / seconds
            scalars["train/skipped_steps"] = engines.student.skipped_steps
            if engines.device.type == "cuda":
                scalars["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(engines.device) / 1e9
            if evaluate_now:
                scalars.update(_eval_scalars(engines, cfg, eval_set, collator, step))
            writer.log(step, scalars)
            progress.set_postfix(loss=f"{means['loss']:.4f}")  # host: a number already read
        progress.update(1)
        if step % cfg.checkpoint.every == 0 or step == end:
            checkpoint.save(engines.student, root, step, _client_state(cfg, step, sampler, engines),
                            cfg.checkpoint.keep)
    progress.close()
    if step == cfg.train.max_steps:
        export_student(engines.student, engines.tokenizer, os.path.join(cfg.output_dir, "student"))
    writer.close()
    return scalars


__all__ = ["run"]
