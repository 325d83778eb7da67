"""No host sync per micro-batch (DESIGN.md §6), counted on CPU.

A GPU stream stalls whenever the host must read a device value: ``.item()``/``bool()``/``float()``
(aten ``_local_scalar_dense``), ops whose output size depends on the data (``nonzero``,
``masked_select``, indexing with a boolean mask, ``unique``, ``repeat_interleave`` without
``output_size``), ``equal``, and copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``). On
CPU nothing stalls, so :class:`SyncCounter` counts them instead: a ``TorchDispatchMode`` sees every
aten call that would sync, and a ``TorchFunctionMode`` sees the copies to the host, which on CPU
never reach aten. Each call is attributed by walking the Python stack: its *source* is the package
of the innermost frame outside torch (the project, transformers or DeepSpeed), its *where* the
innermost frame in the project's own code (the line of ours that led to it).

Host-batch tensors are exempt, by construction: the test tags the collator's tensors before the
step, the tag spreads to every result of an op whose tensor inputs are all tagged (what the step
computes from the host batch on the host, e.g. the kept positions), and a tagged tensor loses it
when it is moved (``.to(device)`` hands back an untagged copy, a real move as on a GPU). Every other
tensor — parameters, optimizer state, the moved batch, whatever a factory makes, everything
derived from them — counts as a device tensor; a sync-making call is counted when one of its
tensor arguments is a device tensor.

The real step: :func:`training.step.train_step` on 2 gloo ranks at TP 2 (ZeRO-3, AutoTP), grad_accum
2, SFT rows (prompts masked; one micro-batch padded, with an attention mask, one not), after one
warm-up step (DeepSpeed's one-time checks are not per step). The loss's row chunks are made small
so that a per-chunk sync would show several times.
"""

import collections
import os
import sys
from typing import List

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from data.prepare import prepare
from model_parallel.testing.device_check import LIBRARY, ROOT
from model_parallel.spawn import run_on_ranks
from tests.tiny_models import llama, save_model

_HOST = "_host_batch"  # attribute set on host-batch tensors (and what is computed from them alone)
_TORCH = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)


def _op(name):
    namespace, _, op = name.partition(".")
    return getattr(getattr(torch.ops, namespace), op)


# Ops that make the host wait for the device whatever their arguments.
_ALWAYS = {_op(name) for name in ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero",
                                  "aten.argwhere", "aten.masked_select", "aten.equal", "aten.unique_consecutive",
                                  "aten.unique_dim", "aten.unique_dim_consecutive", "aten._unique", "aten._unique2")}
_INDEX = {_op("aten.index"), _op("aten.index_put"), _op("aten.index_put_"), _op("aten._index_put_impl_")}
_REPEAT_INTERLEAVE = _op("aten.repeat_interleave")
_HOST_COPIES = ("cpu", "tolist", "numpy")


def _source(path: str) -> str:
    if path.startswith(LIBRARY):
        return "project"
    for package in ("transformers", "deepspeed"):
        if f"{os.sep}{package}{os.sep}" in path:
            return package
    return "other"


def _attribution():
    """(source, where, origin): the package of the innermost frame outside torch and this file, the
    innermost project frame (``path:line``) on the stack, and that innermost frame itself."""
    source, where, origin = None, "outside the project", "?"
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH):
            if source is None:
                source = _source(path)
                origin = f"{path.split('site-packages' + os.sep)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
            if path.startswith(LIBRARY):
                where = f"{os.path.relpath(path, ROOT)}:{frame.f_lineno}"
                break
        frame = frame.f_back
    return source or "other", where, origin


def _tensors(value) -> List[torch.Tensor]:
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def _on_device(tensor) -> bool:
    return not getattr(tensor, _HOST, False)


def _syncs(func, args, kwargs) -> bool:
    """Whether this aten call makes the host wait for its inputs' device."""
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return True
    if packet in _INDEX:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(x is not None and x.dtype in (torch.bool, torch.uint8) for x in indices)
    if packet is _REPEAT_INTERLEAVE:
        overload = func._overloadname
        return overload in ("Tensor", "self_Tensor") and kwargs.get("output_size", None) is None and not (
            len(args) > 3 and args[3] is not None)
    return False


class SyncCounter:
    """Counts host syncs on device tensors while active (see the module docstring).

    ``events``: ``(kind, source, where, op, origin)`` per call; ``kind`` is ``sync`` (an aten call that
    waits for the device) or ``copy`` (``.cpu()``, ``.tolist()``, ``.numpy()`` of a device tensor).
    """

    def __init__(self):
        self.events = []
        counter = self

        class Dispatch(TorchDispatchMode):

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                inputs = _tensors((args, kwargs))
                if _syncs(func, args, kwargs) and any(_on_device(x) for x in inputs):
                    source, where, origin = _attribution()
                    counter.events.append(("sync", source, where, str(func.overloadpacket), origin))
                out = func(*args, **kwargs)
                if inputs and not any(_on_device(x) for x in inputs):
                    for tensor in _tensors(out):
                        setattr(tensor, _HOST, True)  # computed on the host from the host batch alone
                return out

        class Function(TorchFunctionMode):

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in _HOST_COPIES and args and isinstance(args[0], torch.Tensor) and _on_device(args[0]):
                    source, where, origin = _attribution()
                    counter.events.append(("copy", source, where, name, origin))
                out = func(*args, **kwargs)
                if name == "to" and args and isinstance(args[0], torch.Tensor) and not _on_device(args[0]):
                    # A move of a host tensor: on a GPU the result is a device tensor.
                    moved = torch.Tensor.clone(out) if out is args[0] else out
                    if hasattr(moved, _HOST):
                        delattr(moved, _HOST)
                    out = moved
                return out

        self._modes = (Function(), Dispatch())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def by_source(self, kind="sync") -> dict:
        return dict(collections.Counter(event[1] for event in self.events if event[0] == kind))


def tag_host(batch: dict) -> dict:
    for tensor in batch.values():
        setattr(tensor, _HOST, True)
    return batch


def test_the_counter_sees_syncs_on_device_tensors_only():
    host = tag_host({"labels": torch.tensor([[1, -100, 3]], device="cpu")})["labels"]
    weights = torch.randn(3, 4, device="cpu")  # made before the counter and not tagged: a device tensor
    with SyncCounter() as counter:
        kept = (host != -100).nonzero()[:, 1]  # on the host: exempt
        moved = host.to("cpu")  # a move: a device tensor from here on
        rows = weights[host[0] != -100]  # boolean mask on a device tensor
        float(weights.sum())
        moved.tolist()
        kept.tolist()  # the host's own
        weights.index_select(0, kept.to("cpu"))  # index-based: no sync
    kinds = [(event[0], event[3]) for event in counter.events]
    assert kinds == [("sync", "aten.index"), ("sync", "aten._local_scalar_dense"), ("copy", "tolist")], kinds
    assert rows.shape == (2, 4) and moved is not host


def _sft_micro_batches(dataset, collator):
    """Two micro-batches of SFT rows (prompts masked in the labels): one of equal-length rows (no
    padding, no attention mask), one padded (an attention mask)."""

    def row(index, length, prompt):
        ids = list(dataset[index]["input_ids"][:length])
        return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}

    return [collator([row(0, 24, 7), row(1, 24, 13)]), collator([row(2, 32, 5), row(3, 19, 11)])]


def _optimizer_steps(engine):
    """The optimizer's per-parameter step counters: torch keeps them on the host on a GPU too
    (AdamW that is neither capturable nor fused), so reading one there waits for nothing."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return [state["step"] for state in optimizer.state.values()
            if isinstance(state.get("step"), torch.Tensor) and not (optimizer.defaults.get("capturable") or
                                                                    optimizer.defaults.get("fused"))]


def _step_rank(rank, world_size, config_path):
    """Runs on each of 2 ranks: a warm-up step, then one counted step; returns the counter's events."""
    import loss.fused
    import loss.tail
    from data.loader import Collator, load_prepared
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.step import train_step

    cfg = load_config(config_path, [])
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, bf16=False),
                            bf16=False)
    dataset, _ = load_prepared(cfg.data.train)
    collator = Collator(engines.tokenizer.pad_token_id)
    # Row chunks of 8 rows (the fused head's, and the divergence's inside them): a sync per chunk
    # would show several times per micro-batch.
    loss.tail.CHUNK_NUMEL = loss.tail.CPU_CHUNK_NUMEL = 8 * (engines.vocab_size // 2)
    loss.fused.CHUNK_NUMEL = loss.fused.CPU_CHUNK_NUMEL = 8 * (engines.vocab_size // 2)
    train_step(engines, cfg.loss, _sft_micro_batches(dataset, collator))  # warm-up: one-time checks and state
    micro_batches = [tag_host(batch) for batch in _sft_micro_batches(dataset, collator)]
    for step in _optimizer_steps(engines.student):
        setattr(step, _HOST, True)
    with SyncCounter() as counter:
        result = train_step(engines, cfg.loss, micro_batches)
    return {"events": counter.events, "skipped": result.skipped, "loss": float(result.sums["loss"]),
            "tokens": float(result.tokens)}


@pytest.fixture(scope="module")
def counted_step(tmp_path_factory, tokenizer_dir, tokenizer, demo_dir):
    root = tmp_path_factory.mktemp("syncs")
    prepare(str(tokenizer_dir), [str(demo_dir / "pretrain/eval.txt")], str(root / "data"), fmt="text", seq_len=32)
    llama(512, layers=1).to_json_file(str(root / "student.json"))
    config = {
        "output_dir": str(root / "run"), "seed": 5, "tokenizer": str(tokenizer_dir),
        "teacher": {"path": save_model(llama(520, hidden=48, layers=1), root / "teacher", tokenizer)},
        "student": {"config": str(root / "student.json")},
        "data": {"train": str(root / "data")},
        "loss": {"kind": "tail", "top_k": 5, "beta": 2.0, "beta_mode": "sequence"},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 1, "dtype": "fp32"},
        "parallel": {"tensor_parallel": 2, "deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json")},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_on_ranks(2, _step_rank, str(path), deepspeed=True, timeout=300)


def _summary(events):
    return "\n".join(f"{count} x {event}" for event, count in collections.Counter(events).most_common())


def test_a_training_step_makes_no_host_sync_per_micro_batch(counted_step):
    """The issue's bounds per optimizer step (TP 2, grad_accum 2, nothing logged): at most 2 from the
    project's own code, at most 6 with DeepSpeed's and transformers'. The project makes none (a
    per-micro-batch sync would show twice, a per-chunk one more often), and copies nothing to the
    host; transformers never inspects position ids for packing, and its sdpa mask makes one host
    read per forward at most (4 forwards); DeepSpeed reads its gradient norm (the step decision)."""
    for out in counted_step:
        # Next-token targets past each masked prompt (one data-parallel rank): 17 + 11, then 27 + 8.
        assert not out["skipped"] and out["loss"] == out["loss"] and out["tokens"] == 17 + 11 + 27 + 8
        events = out["events"]
        print(f"rank's host syncs in one step:\n{_summary(events)}")
        project = [event for event in events if event[1] == "project"]
        assert project == [], _summary(project)
        assert not [event for event in events if "find_packed_sequence_indices" in event[4]], _summary(events)
        assert sum(event[1] == "transformers" for event in events) <= 4, _summary(events)
        assert len(events) <= 6, _summary(events)
        assert all(event[0] == "sync" for event in events), _summary(events)
