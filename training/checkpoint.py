"""Checkpoints of the student engine: tagged ``step_<N>``, ``latest`` written last and atomically.

DeepSpeed writes ``latest`` before its final barrier and without fsync/rename, and
``load_checkpoint`` returns ``(None, None)`` when there is nothing to load. Here every rank saves
its shards with ``save_latest=False``; after a barrier rank 0 points ``latest`` at the tag (temp
file + fsync + rename), so ``latest`` only ever names a checkpoint all ranks finished; a resume
that finds nothing it was asked for raises instead of starting over.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from training.config import ConfigError

LATEST = "latest"
LAYOUT = "layout.json"
TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step}"


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain lists (no pickled objects in checkpoints)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(engine, root: str, step: int, client_state: dict, keep: int) -> str:
    """Save ``step_<step>`` on every rank, then publish it as ``latest`` and prune old tags.

    ``client_state["layout"]`` is also written as ``<tag>/layout.json`` (plain JSON), so tools
    such as ``launch.export`` know the world the checkpoint was sharded for without loading it.
    """
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_atomically(os.path.join(root, tag, LAYOUT), json.dumps(client_state["layout"]))
        write_atomically(os.path.join(root, LATEST), tag)
        for old in sorted(_tags(root), key=lambda t: int(TAG.match(t).group(1)))[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return tag


def _tags(root: str):
    return [name for name in os.listdir(root) if TAG.match(name) and os.path.isdir(os.path.join(root, name))]


def find_resume(resume: str, default_root: str):
    """``(root, tag)`` to resume from, or None to start fresh (only for ``auto`` without checkpoints)."""
    if resume == "never":
        return None
    root = default_root if resume == "auto" else resume
    tag = None
    if resume != "auto" and TAG.match(os.path.basename(os.path.normpath(root))):
        root, tag = os.path.split(os.path.normpath(root))
    if tag is None:
        latest = os.path.join(root, LATEST)
        if not os.path.isfile(latest):
            if resume == "auto":
                return None
            raise ConfigError(f"checkpoint.resume: no checkpoint to resume in {root} ({LATEST} is missing)")
        with open(latest) as handle:
            tag = handle.read().strip()
    if not os.path.isdir(os.path.join(root, tag)):
        raise ConfigError(f"checkpoint.resume: {os.path.join(root, LATEST)} names {tag!r}, which does not exist")
    return root, tag


def read_layout(root: str, tag: str) -> dict:
    path = os.path.join(root, tag, LAYOUT)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {tag}: {path} is missing (not written by launch.distill?)") from None


def load(engine, root: str, tag: str) -> dict:
    """Load ``root/tag`` into ``engine`` and return its client state; never silently nothing."""
    path, client_state = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {root}")
    return client_state


def refuse_drift(saved: dict, current: dict, tag: str) -> None:
    """Raise if the checkpoint's run identity (models, tokenizer, loss, data, seed) differs."""
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differing:
        details = "; ".join(f"{key}: checkpoint {saved.get(key)!r} vs config {current.get(key)!r}" for key in differing)
        raise ConfigError(f"checkpoint {tag} was written by a different run ({details})")
