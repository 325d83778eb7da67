"""Where a run starts, and what a checkpoint keeps of the job so that it can start there.

:func:`client_state` is what the job saves beside DeepSpeed's shards (the step, the sampler's position,
the run's identity and the layout it was trained on); :func:`plan_resume` reads it back, once, before
any model is built: the verified tag to resume from (:func:`training.checkpoint.find_resume`),
refused by name if another run wrote it (:func:`refuse_drift`), if the global batch or the ZeRO stage
changed, or if another layout would drop a trained head (:func:`_check_head`); on another TP x DP
layout it is converted first (``training.universal``). The mechanics of saving, verifying and
loading a tag are ``training.checkpoint``'s.
"""

import dataclasses
import os
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch.distributed as dist

from core.errors import CheckpointError
from data.loader import global_batch_size
from model_parallel.distributed import decided_on_rank_0
from model_parallel.file_wait import produced_on_rank_0
from training import universal
from training.checkpoint import (COMPLETE, HEAD, find_resume, load, read_client_state, read_rng_state,
                                 set_rng_state, universal_tag)
from training.config import RunConfig, identity
from training.models import load_model_config


def checkpoints_dir(cfg: RunConfig) -> str:
    """Where the run saves its checkpoints (and ``checkpoint.resume: auto`` looks)."""
    return os.path.join(cfg.output_dir, "checkpoints")


def client_state(cfg: RunConfig, step: int, sampler, engines) -> dict:
    """The job's state saved with step ``step`` (plain JSON): read back by :func:`plan_resume`.

    ``sampler`` is the run's ``data.loader.GlobalBatchSampler``, ``engines`` its built engines.
    ``layout`` is the world the student was sharded for; ``training.checkpoint.save`` adds its
    ZeRO partitions and head record and also writes it as ``layout.json``.
    """
    return {
        "step": step,
        "sampler": sampler.state_dict(),
        "run_identity": identity(cfg),
        "layout": {"tensor_parallel": cfg.parallel.tensor_parallel, "data_parallel": engines.dp_size,
                   "global_batch_size": sampler.global_batch_size, "vocab_size": engines.vocab_size,
                   "world_size": dist.get_world_size(), "bf16": engines.student.bfloat16_enabled(),
                   "zero_stage": engines.student.zero_optimization_stage()},
    }


def default_identity() -> dict:
    """:func:`training.config.identity` of a config holding every default (not validated: the
    defaults name no model), for the keys a checkpoint's saved identity predates."""
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(RunConfig)}
    return identity(SimpleNamespace(**defaults))


def refuse_drift(saved: dict, current: dict, tag: str, allowed=()) -> None:
    """Raise if the checkpoint's run identity (models, tokenizer, loss, data, seed) differs in a key
    not listed in ``allowed``. A key the saved identity lacks (added to the config after the
    checkpoint was written) is taken at its default (:func:`default_identity`): the run that wrote
    the checkpoint computed what the default computes."""
    saved = {**{key: value for key, value in default_identity().items() if key in current}, **saved}
    differing = sorted(key for key in set(saved) | set(current)
                       if saved.get(key) != current.get(key) and key not in allowed)
    if differing:
        details = "; ".join(f"{key}: checkpoint {saved.get(key)!r} vs config {current.get(key)!r}" for key in differing)
        raise CheckpointError(f"checkpoint {tag} was written by a different run ({details}); "
                              f"--set checkpoint.allow_config_change={','.join(differing)} accepts the change")


@dataclass
class ResumePlan:
    """Where a run starts: decided once, on rank 0, before any model is built; the same on every rank.

    :meth:`restore` then loads it on every rank, each rank's own RNG states included.
    """

    root: str
    """The checkpoints directory the tag is in."""
    tag: Optional[str] = None
    """The verified tag to resume from; None starts fresh."""
    load_tag: Optional[str] = None
    """What the engine loads: ``tag``, or its universal conversion when the layout changed."""
    step: int = 0
    consumed_samples: int = 0

    @property
    def universal(self) -> bool:
        """The engine must be built with ``checkpoint.load_universal``."""
        return self.load_tag is not None and self.load_tag != self.tag

    def restore(self, engine) -> None:
        """Load the student's shards and this rank's RNG states (nothing when starting fresh)."""
        if self.tag is None:
            return
        load(engine, self.root, self.load_tag)
        set_rng_state(read_rng_state(self.root, self.tag, dist.get_rank()))


def _converted(root: str, tag: str) -> str:
    """``tag`` converted for another TP x DP layout (DeepSpeed's universal checkpoint re-partitions
    every tensor); any failure becomes a :class:`CheckpointError` naming the tag."""
    try:
        return universal.convert(root, tag)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 -- the traceback is printed, the message names the tag
        traceback.print_exc()
        raise CheckpointError(f"checkpoint {tag}: conversion to the universal format failed: {error!r}") from None


def _config_ties_head(section) -> bool:
    """Whether the student's model config ties its LM head to its embedding (read, not built)."""
    config = load_model_config(section, "student")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _check_head(cfg: RunConfig, tag: str, layout: dict) -> None:
    """Refuse, before any model is built, a resume on another layout that would tie a head the
    checkpoint trained apart from its embedding.

    A Gemma-2 student (tied, scaled embedding) is untied at ``tensor_parallel`` > 1
    (``training.engines``). Tied at save and untied now: ``training.universal`` gives the new head
    the tied matrix's weight and Adam moments (a fresh untied run's head also starts as the
    embedding's copy). Untied at save (TP > 1) and tied now (TP 1): one of the two trained matrices would be
    dropped, so the resume is refused by name. Checkpoints without the record pass unchanged.
    """
    record, saved_tp, tp = layout.get(HEAD), layout["tensor_parallel"], cfg.parallel.tensor_parallel
    if not record or record["tied"] or not record["scaled_embedding"] or saved_tp == 1 or tp > 1:
        return
    if _config_ties_head(cfg.student):
        raise CheckpointError(
            f"checkpoint {tag} was saved at parallel.tensor_parallel={saved_tp}, where the student's tied head is "
            f"untied ({record['head']} trained apart from its scaled embedding {record['embedding']}); this run uses "
            f"tensor_parallel={tp}, where the head is tied to the embedding and the trained {record['head']} would be "
            f"dropped; resume at tensor_parallel > 1, or export the student (python -m launch.export) and start a run "
            f"from it (student.path: its config is untied)")


def _load_tag(cfg: RunConfig, tag: str, layout: dict, world_size: int, student_stage: int) -> str:
    """What the engine loads of ``tag`` saved on ``layout``: the tag itself on the same layout, its
    universal conversion on another one; refused where the global batch or ZeRO stage changed."""
    tp = cfg.parallel.tensor_parallel
    dp = world_size // tp
    batch = global_batch_size(cfg.train.micro_batch_size, cfg.train.grad_accum, dp)
    if batch != layout["global_batch_size"] and not cfg.checkpoint.allow_batch_change:
        raise CheckpointError(f"train: checkpoint {tag} was trained with a global batch of "
                              f"{layout['global_batch_size']} sequences, this run has {batch} "
                              f"(micro_batch_size x grad_accum x data-parallel {dp}); adjust train.grad_accum or "
                              f"--set checkpoint.allow_batch_change=true")
    saved_stage = layout.get("zero_stage", 3)
    if saved_stage != student_stage:
        raise CheckpointError(f"checkpoint {tag} holds a ZeRO-{saved_stage} student and this run asks for "
                              f"ZeRO-{student_stage} (parallel.student_zero_stage / zero_optimization.stage); "
                              f"resume at stage {saved_stage}")
    if (layout["tensor_parallel"], layout["data_parallel"]) == (tp, dp):
        return tag
    if student_stage != 3:
        raise CheckpointError(f"checkpoint {tag}: resuming a ZeRO-{student_stage} student on another TP x DP layout "
                              f"is not supported yet (the universal conversion handles ZeRO-3 students); resume at "
                              f"TP {layout['tensor_parallel']} x DP {layout['data_parallel']}")
    _check_head(cfg, tag, layout)
    return universal_tag(tag)  # converted by plan_resume, outside any collective


def _decide(cfg: RunConfig, world_size: int, student_stage: int) -> ResumePlan:
    """Rank 0's side of :func:`plan_resume`."""
    root = checkpoints_dir(cfg)
    found = find_resume(cfg.checkpoint.resume, root, fallback=cfg.checkpoint.fallback)
    if found is None:
        return ResumePlan(root=root)
    root, tag = found
    state = read_client_state(root, tag)
    allowed = [key.strip() for key in cfg.checkpoint.allow_config_change.split(",") if key.strip()]
    refuse_drift(state["run_identity"], identity(cfg), tag, allowed)
    return ResumePlan(root=root, tag=tag, load_tag=_load_tag(cfg, tag, state["layout"], world_size, student_stage),
                      step=state["step"], consumed_samples=state["sampler"]["consumed_samples"])


def plan_resume(cfg: RunConfig, world_size: int, student_stage: int) -> ResumePlan:
    """Collective: rank 0 finds and verifies the checkpoint to resume, once, and checks it belongs to
    this run (and its ZeRO stage); every rank gets the plan or the same error. For another layout,
    rank 0 then converts it (minutes to hours, by the student's size) while the other ranks wait on
    the file system for the conversion's completion marker, not inside a collective, whose timeout
    (``parallel.timeout_s``) would otherwise bound the conversion."""
    plan = decided_on_rank_0("finding the checkpoint to resume", lambda: _decide(cfg, world_size, student_stage),
                             unexpected=CheckpointError)
    if plan.universal:
        target = os.path.join(plan.root, plan.load_tag)
        produced_on_rank_0(f"the universal conversion of checkpoint {plan.tag} ({target})",
                           lambda: _converted(plan.root, plan.tag),
                           done=lambda: os.path.isfile(os.path.join(target, COMPLETE)), marker=target,
                           limit_s=float(cfg.parallel.timeout_s), error=CheckpointError)
    return plan
