"""Count the bytes handed to ``torch.distributed`` collectives, for tests and benchmarks.

It patches the collectives at the ``torch.distributed`` module level, and the two DeepSpeed's
torch backend binds at start-up (its all-gather and reduce-scatter), so it sees every call made
through them (ours and DeepSpeed's alike) without trusting the code under test to report its own
traffic. DeepSpeed's CPU shared-memory all-reduce (the ``shm`` op) bypasses torch and is not seen.
"""

import contextlib
from dataclasses import dataclass, field

import torch.distributed as dist

_COUNTED = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "broadcast", "all_to_all_single")


@dataclass
class CollectiveBytes:
    """Bytes each rank passed *into* collectives, per collective name."""

    calls: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def _input_bytes(name, args, kwargs):
    if name == "all_gather":  # all_gather(tensor_list, tensor)
        tensor = args[1] if len(args) > 1 else kwargs["tensor"]
    elif name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
        tensor = args[1] if len(args) > 1 else kwargs["input"] if "input" in kwargs else kwargs["input_tensor"]
    else:
        tensor = args[0] if args else kwargs["tensor"]
    return tensor.numel() * tensor.element_size()


def _deepspeed_backend():
    """DeepSpeed's torch backend, when ``deepspeed.comm`` is initialised: it binds
    ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` once (ZeRO-3's parameter gathers and
    gradient reduce-scatters), so those are counted where it keeps them."""
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    return getattr(comm, "cdb", None) if comm is not None else None


@contextlib.contextmanager
def count_collective_bytes():
    """``with count_collective_bytes() as counted: ...`` → ``counted.bytes``, ``counted.calls``."""
    counted = CollectiveBytes()
    originals = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}
    backend = _deepspeed_backend()
    bound = {attribute: (name, getattr(backend, attribute))
             for attribute, name in (("all_gather_function", "all_gather_into_tensor"),
                                     ("reduce_scatter_function", "reduce_scatter_tensor"))
             if backend is not None and getattr(backend, attribute, None) is not None}

    def counting(name, original):

        def wrapper(*args, **kwargs):
            counted.calls[name] = counted.calls.get(name, 0) + 1
            counted.bytes[name] = counted.bytes.get(name, 0) + _input_bytes(name, args, kwargs)
            return original(*args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    for attribute, (name, original) in bound.items():
        setattr(backend, attribute, counting(name, original))
    try:
        yield counted
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        for attribute, (_, original) in bound.items():
            setattr(backend, attribute, original)
