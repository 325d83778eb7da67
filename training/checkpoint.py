"""Checkpoints of the student engine: tagged ``step_<N>``, verified, ``latest`` written last.

DeepSpeed writes ``latest`` before its final barrier and without fsync/rename, and
``load_checkpoint`` returns ``(None, None)`` when there is nothing to load. Here every rank saves
its shards with ``save_latest=False``; after a barrier rank 0 writes the tag's sha256 manifest
and its completion marker, then points ``latest`` at it (temp file + fsync + rename). So ``latest``
only ever names a checkpoint every rank finished; a tag without its marker is incomplete (ignored
with a warning, replaced by the next save of that tag); a resume verifies the manifest before
anything is deserialised, and a resume that finds nothing it was asked for raises instead of
starting over (``checkpoint.fallback`` resumes from the newest complete, verified tag instead).
"""

import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from core.errors import CheckpointError
from core.files import write_atomically
from model_parallel.byte_gather import all_gather_bytes
from model_parallel.distributed import decided_on_rank_0
from model_parallel.file_wait import produced_on_rank_0
from training import faults
from training.config import RunConfig, identity

LATEST = "latest"
LAYOUT = "layout.json"
CLIENT_STATE = "client_state.json"
MANIFEST = "manifest.sha256"
COMPLETE = "COMPLETE"
TAG = re.compile(r"^step_(\d+)$")
UNIVERSAL_SUFFIX = "_universal"
ZERO_PARTITIONS = "zero_partitions"
HEAD = "head"


def tag_for(step: int) -> str:
    return f"step_{step}"


def universal_tag(tag: str) -> str:
    """Where ``training.universal`` writes ``tag`` converted for another layout."""
    return f"{tag}{UNIVERSAL_SUFFIX}"


def rng_file(rank: int) -> str:
    """Each rank's RNG states, in the tag directory (listed in its manifest like every file)."""
    return f"rng_rank{rank}.json"


def rng_state() -> dict:
    """This rank's Python, numpy, torch CPU and accelerator RNG states as plain lists (no pickle)."""
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    accelerator = get_accelerator()
    on_host = accelerator.device_name() == "cpu"  # the CPU accelerator's generator *is* torch's
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
        "accelerator": None if on_host else accelerator.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8, device="cpu"))
    if state.get("accelerator") is not None:
        get_accelerator().set_rng_state(torch.tensor(state["accelerator"], dtype=torch.uint8, device="cpu"))


def read_rng_state(root: str, tag: str, rank: int) -> dict:
    """``rank``'s RNG states saved in ``root/tag``; rank 0's where the checkpoint had fewer ranks
    (another layout: every rank was seeded alike, so nothing better exists)."""
    path = os.path.join(root, tag, rng_file(rank))
    if not os.path.isfile(path):
        path = os.path.join(root, tag, rng_file(0))
    with open(path) as handle:
        return json.load(handle)


def save(engine, root: str, step: int, client_state: dict, keep: int) -> str:
    """Save ``step_<step>`` on every rank, then publish it as ``latest`` and prune old tags.

    Every rank also writes its own RNG states (:func:`rng_file`). ``client_state["layout"]`` is
    also written as ``<tag>/layout.json`` (plain JSON), so tools
    such as ``launch.export`` know the world the checkpoint was sharded for without loading it;
    it gains the ZeRO-3 partitioning of every optimizer file (see :func:`zero_partitions`) and
    whether the LM head was tied to the embedding (see :func:`head_record`).

    Collectives: barriers and two tensor all-gathers on the engine's device (besides DeepSpeed's
    own); no object collective.
    """
    tag = tag_for(step)
    client_state = {**client_state, "layout": {**client_state["layout"], ZERO_PARTITIONS: zero_partitions(engine),
                                               HEAD: head_record(engine.module)}}
    if dist.get_rank() == 0 and os.path.isdir(os.path.join(root, tag)):
        shutil.rmtree(os.path.join(root, tag))  # an incomplete leftover of a crashed save
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    write_atomically(os.path.join(root, tag, rng_file(dist.get_rank())), json.dumps(rng_state()))
    faults.point(f"saving {tag}")
    dist.barrier()
    if dist.get_rank() == 0:
        publish(root, tag, step, client_state)
        _replace_zero_to_fp32(root)
        for old in sorted(_tags(root), key=lambda t: int(TAG.match(t).group(1)))[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
            shutil.rmtree(os.path.join(root, universal_tag(old)), ignore_errors=True)
    dist.barrier()
    return tag


ZERO_TO_FP32 = "zero_to_fp32.py"
_ZERO_TO_FP32_STUB = '''#!/usr/bin/env python3
"""Written by launch.distill in place of DeepSpeed's zero_to_fp32.py, which cannot rebuild a student from
these checkpoints (AutoTP tensor-parallel shards, ZeRO partitions of replicated parameters)."""
import os
import sys

sys.exit(f"error: export the student with: python -m launch.export {os.path.dirname(os.path.abspath(__file__))} OUT_DIR")
'''


def _replace_zero_to_fp32(root: str) -> None:
    """DeepSpeed drops ``zero_to_fp32.py`` beside every checkpoint; on these checkpoints it fails with a
    misleading message, so the copy here says in one line what to run instead."""
    write_atomically(os.path.join(root, ZERO_TO_FP32), _ZERO_TO_FP32_STUB)


def zero_partitions(engine) -> dict:
    """Collective: ``{optimizer file name: [[partition count, partition rank] per sub-group]}``.

    ZeRO-3 partitions a group of tensor-parallel replicated parameters over all TP x DP ranks and
    a group of sharded ones over DP only; the files do not say which, and converting a checkpoint
    to another layout (``training.universal``) needs to know.
    """
    if engine.zero_optimization_stage() != 3:
        return {}
    optimizer = engine.optimizer
    name = os.path.basename(engine._get_zero_ckpt_name("", ""))
    groups = [[optimizer._get_sub_group_partition_count(i), optimizer._get_sub_group_partition_rank(i)]
              for i in range(len(optimizer.fp16_groups))]
    # Two tensor all-gathers on the engine's device, not all_gather_object: this runs at every save
    # and an object collective pickles through the device (DESIGN.md §6).
    gathered = all_gather_bytes(json.dumps([name, groups]).encode(), device=engine.device)
    return dict(json.loads(record) for record in gathered)


def head_record(model) -> Optional[dict]:
    """``{"tied", "head", "embedding", "scaled_embedding"}`` of an HF causal LM (None for other modules).

    ``tied``: the head's weight *is* the embedding's; ``head``/``embedding``: their parameter names;
    ``scaled_embedding``: the embedding is not a plain ``nn.Embedding`` (Gemma-2's scaled one),
    which ``training.engines`` unties at ``tensor_parallel`` > 1 (AutoTP cannot share it). So a
    Gemma-2 student is tied at TP 1 and untied at TP > 1: a resume across that boundary changes
    the parameter set, and :func:`_check_head` and ``training.universal`` use this record to carry
    it over or refuse it.
    """
    get_head, get_embedding = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_head() if get_head else None
    embedding = get_embedding() if get_embedding else None
    if head is None or embedding is None:
        return None
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    return {"tied": head.weight is embedding.weight, "head": f"{names[id(head)]}.weight",
            "embedding": f"{names[id(embedding)]}.weight",
            "scaled_embedding": type(embedding) is not torch.nn.Embedding}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(tag_dir: str):
    for directory, _, names in os.walk(tag_dir):
        for name in sorted(names):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, tag_dir)
            if relative not in (MANIFEST, COMPLETE):
                yield relative, path


def _manifest(tag_dir: str) -> str:
    return "".join(f"{_sha256(path)}  {os.path.getsize(path)}  {relative}\n"
                   for relative, path in sorted(_files(tag_dir)))


def verify(root: str, tag: str) -> None:
    """Raise :class:`CheckpointError` naming the file and tag unless ``tag`` is complete and intact."""
    tag_dir = os.path.join(root, tag)
    if not os.path.isfile(os.path.join(tag_dir, COMPLETE)):
        raise CheckpointError(f"checkpoint {tag}: incomplete ({os.path.join(tag_dir, COMPLETE)} is missing)")
    try:
        with open(os.path.join(tag_dir, MANIFEST)) as handle:
            listed = [line.rstrip("\n").split("  ", 2) for line in handle if line.strip()]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tag}: {os.path.join(tag_dir, MANIFEST)} is missing") from None
    present = dict(_files(tag_dir))
    for digest, size, relative in listed:
        path = os.path.join(tag_dir, relative)
        if relative not in present:
            raise CheckpointError(f"checkpoint {tag}: {path} is missing")
        if os.path.getsize(path) != int(size):
            raise CheckpointError(f"checkpoint {tag}: {path} has {os.path.getsize(path)} bytes, the manifest says {size}")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint {tag}: {path} does not match its sha256 in the manifest")
    unlisted = sorted(set(present) - {relative for _, _, relative in listed})
    if unlisted:
        raise CheckpointError(f"checkpoint {tag}: {os.path.join(tag_dir, unlisted[0])} is not in the manifest")


def _complete_tags(root: str):
    """Tags with a completion marker, newest first."""
    tags = [t for t in _tags(root) if os.path.isfile(os.path.join(root, t, COMPLETE))]
    return sorted(tags, key=lambda t: int(TAG.match(t).group(1)), reverse=True)


def publish(root: str, tag: str, step: int, client_state: dict) -> None:
    """Rank 0, once every rank has written ``root/tag``: our state as plain JSON (so resuming reads
    no pickle), the manifest, the marker, then ``latest``."""
    write_atomically(os.path.join(root, tag, LAYOUT), json.dumps(client_state["layout"]))
    write_atomically(os.path.join(root, tag, CLIENT_STATE), json.dumps(client_state))
    write_atomically(os.path.join(root, tag, MANIFEST), _manifest(os.path.join(root, tag)))
    write_atomically(os.path.join(root, tag, COMPLETE), f"{step}\n")
    write_atomically(os.path.join(root, LATEST), tag)


def _tags(root: str):
    return [name for name in os.listdir(root) if TAG.match(name) and os.path.isdir(os.path.join(root, name))]


def find_resume(resume: str, default_root: str, *, fallback: bool = False, warn=None):
    """``(root, tag)`` to resume from, verified, or None to start fresh.

    Only ``resume: auto`` with no complete checkpoint at all starts fresh. A missing, empty or
    dangling ``latest`` (while complete tags exist), an incomplete tag or a manifest mismatch
    raises :class:`CheckpointError` naming the file and tag, unless ``fallback`` is set: then the
    newest complete tag that verifies is used, with a warning.
    """
    if resume == "never":
        return None
    warn = warn or (lambda message: print(message, file=sys.stderr))
    root = default_root if resume == "auto" else resume
    if resume != "auto" and TAG.match(os.path.basename(os.path.normpath(root))):
        root, tag = os.path.split(os.path.normpath(root))
        verify(root, tag)
        return root, tag
    if not os.path.isdir(root):
        if resume == "auto":
            return None
        raise CheckpointError(f"checkpoint.resume: {root} does not exist")
    for tag in _tags(root):
        if tag not in _complete_tags(root):
            warn(f"warning: checkpoint {os.path.join(root, tag)} is incomplete (no {COMPLETE} marker); ignoring it")
    latest = os.path.join(root, LATEST)
    try:
        if not os.path.isfile(latest):
            if not _complete_tags(root) and resume == "auto":
                return None
            raise CheckpointError(f"checkpoint.resume: {latest} is missing")
        with open(latest) as handle:
            tag = handle.read().strip()
        if not tag:
            raise CheckpointError(f"checkpoint.resume: {latest} is empty")
        if not os.path.isdir(os.path.join(root, tag)):
            raise CheckpointError(f"checkpoint.resume: {latest} names {tag!r}, which does not exist")
        verify(root, tag)
        return root, tag
    except CheckpointError as error:
        if not fallback:
            raise
        for tag in _complete_tags(root):
            try:
                verify(root, tag)
            except CheckpointError:
                continue
            warn(f"warning: {error}; checkpoint.fallback: resuming from {os.path.join(root, tag)} instead")
            return root, tag
        raise CheckpointError(f"{error}; checkpoint.fallback found no complete, verified checkpoint in {root}") from None


def read_layout(root: str, tag: str) -> dict:
    path = os.path.join(root, tag, LAYOUT)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {tag}: {path} is missing (not written by launch.distill?)") from None


def client_state(root: str, tag: str) -> dict:
    """The job's own state of ``root/tag`` (sampler, RNG, run identity, layout), from plain JSON."""
    with open(os.path.join(root, tag, CLIENT_STATE)) as handle:
        return json.load(handle)


def load(engine, root: str, tag: str) -> None:
    """Load ``root/tag`` into ``engine``; never silently nothing.

    An engine built with ``checkpoint.load_universal`` loads a universal tag. DeepSpeed 0.19.8
    then hands every optimizer group the *same* ``step`` tensor; torch's Adam advances it once per
    group and every step after the first uses the wrong bias correction, so each group gets its
    own copy.
    """
    path, _ = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {root}")
    if engine.load_universal_checkpoint():
        for state in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def refuse_drift(saved: dict, current: dict, tag: str, allowed=()) -> None:
    """Raise if the checkpoint's run identity (models, tokenizer, loss, data, seed) differs in a key
    not listed in ``allowed``."""
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
    """The run's checkpoints directory."""
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


def _global_batch_of(cfg: RunConfig, world_size: int) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * (world_size // cfg.parallel.tensor_parallel)


def checkpoints_dir(cfg: RunConfig) -> str:
    """Where the run saves its checkpoints (and ``checkpoint.resume: auto`` looks)."""
    return os.path.join(cfg.output_dir, "checkpoints")


def _converted(root: str, tag: str) -> str:
    """``tag`` converted for another TP x DP layout (DeepSpeed's universal checkpoint re-partitions
    every tensor); any failure becomes a :class:`CheckpointError` naming the tag."""
    from training import universal

    try:
        return universal.convert(root, tag)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 -- the traceback is printed, the message names the tag
        import traceback

        traceback.print_exc()
        raise CheckpointError(f"checkpoint {tag}: conversion to the universal format failed: {error!r}") from None


def _config_ties_head(section) -> bool:
    """Whether the student's model config ties its LM head to its embedding (read, not built)."""
    from training.engines import _model_config

    config = _model_config(section, "student")
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


def _decide(cfg: RunConfig, world_size: int, student_stage: int) -> ResumePlan:
    """Rank 0's side of :func:`plan_resume`."""
    root = checkpoints_dir(cfg)
    found = find_resume(cfg.checkpoint.resume, root, fallback=cfg.checkpoint.fallback)
    if found is None:
        return ResumePlan(root=root)
    root, tag = found
    state = client_state(root, tag)
    allowed = [key.strip() for key in cfg.checkpoint.allow_config_change.split(",") if key.strip()]
    refuse_drift(state["run_identity"], identity(cfg), tag, allowed)
    layout, global_batch = state["layout"], _global_batch_of(cfg, world_size)
    if global_batch != layout["global_batch_size"] and not cfg.checkpoint.allow_batch_change:
        dp = world_size // cfg.parallel.tensor_parallel
        raise CheckpointError(f"train: checkpoint {tag} was trained with a global batch of "
                              f"{layout['global_batch_size']} sequences, this run has {global_batch} "
                              f"(micro_batch_size x grad_accum x data-parallel {dp}); adjust train.grad_accum or "
                              f"--set checkpoint.allow_batch_change=true")
    saved_stage, stage = layout.get("zero_stage", 3), student_stage
    if saved_stage != stage:
        raise CheckpointError(f"checkpoint {tag} holds a ZeRO-{saved_stage} student and this run asks for ZeRO-{stage} "
                              f"(parallel.student_zero_stage / zero_optimization.stage); resume at stage {saved_stage}")
    if (layout["tensor_parallel"], layout["data_parallel"]) != (cfg.parallel.tensor_parallel,
                                                                 world_size // cfg.parallel.tensor_parallel):
        if stage != 3:
            raise CheckpointError(f"checkpoint {tag}: resuming a ZeRO-{stage} student on another TP x DP layout is "
                                  f"not supported yet (the universal conversion handles ZeRO-3 students); resume at "
                                  f"TP {layout['tensor_parallel']} x DP {layout['data_parallel']}")
        _check_head(cfg, tag, layout)
        load_tag = universal_tag(tag)  # converted by plan_resume, outside any collective
    else:
        load_tag = tag
    return ResumePlan(root=root, tag=tag, load_tag=load_tag, step=state["step"],
                      consumed_samples=state["sampler"]["consumed_samples"])


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
