"""Checkpoints of the student engine: tagged ``step_<N>``, verified, ``latest`` written last.

DeepSpeed writes ``latest`` before its final barrier and without fsync/rename, and
``load_checkpoint`` returns ``(None, None)`` when there is nothing to load. Here every rank saves
its shards with ``save_latest=False``; after a barrier rank 0 writes the tag's sha256 manifest
and its completion marker, then points ``latest`` at it (temp file + fsync + rename). So ``latest``
only ever names a checkpoint every rank finished; a tag without its marker is incomplete (ignored
with a warning, replaced by the next save of that tag); a resume verifies the manifest before
anything is deserialised, and a resume that finds nothing it was asked for raises instead of
starting over (``checkpoint.fallback`` resumes from the newest complete, verified tag instead).
Whether and how a run resumes a tag, and the job state saved with it, are ``training.resume``'s.
"""

import json
import os
import random
import re
import shutil
import sys
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from core.errors import CheckpointError
from core.files import sha256_of, write_atomically
from model_parallel.byte_gather import all_gather_bytes
from training import faults
from training.models import scaled_embedding, tied_head

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
    ``scaled_embedding``: the embedding is not a plain one (Gemma-2's scaled one; AutoTP's
    vocabulary-parallel copy of a plain one counts as plain, ``training.models.scaled_embedding``),
    which ``training.models`` unties at ``tensor_parallel`` > 1 (AutoTP cannot share it). So a
    Gemma-2 student is tied at TP 1 and untied at TP > 1: a resume across that boundary changes
    the parameter set, and ``training.resume`` and ``training.universal`` use this record to carry
    it over or refuse it.
    """
    get_head, get_embedding = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_head() if get_head else None
    embedding = get_embedding() if get_embedding else None
    if head is None or embedding is None:
        return None
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    return {"tied": tied_head(model), "head": f"{names[id(head)]}.weight",
            "embedding": f"{names[id(embedding)]}.weight", "scaled_embedding": scaled_embedding(embedding)}


def _files(tag_dir: str):
    for directory, _, names in os.walk(tag_dir):
        for name in sorted(names):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, tag_dir)
            if relative not in (MANIFEST, COMPLETE):
                yield relative, path


def _manifest(tag_dir: str) -> str:
    return "".join(f"{sha256_of(path)}  {os.path.getsize(path)}  {relative}\n"
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
        if sha256_of(path) != digest:
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


def read_client_state(root: str, tag: str) -> dict:
    """The job's own state saved in ``root/tag`` (``training.resume.client_state``), from plain JSON."""
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
