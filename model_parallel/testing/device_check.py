"""Check the one-device discipline (DESIGN.md §6) on a machine without an accelerator.

On a CPU-only machine a tensor made without ``device=`` and a tensor made on the engine's device
look the same, so a forgotten ``device=`` only shows on a GPU, where NCCL refuses the CPU tensor.
:func:`one_device` makes it show here:

- every tensor constructor (``torch.zeros``, ``torch.tensor``, …) called *from the project's own
  code* without a device builds on ``meta`` instead, the way ``torch.set_default_device("meta")``
  would, but scoped to the project's frames (DeepSpeed's and transformers' internals keep the real
  default, so the engines still run);
- every ``torch.distributed`` collective checks that its tensors are on the engine's device and
  names the collective and the project line that led to it otherwise; the object collectives
  (``all_gather_object``, ``broadcast_object_list``, …), which pickle through the device on every
  call, are refused when the library calls them (DeepSpeed's one-time input check may).

Used by tests around the training step and evaluation; it costs a frame walk per constructor and
collective, so it is never on in the job itself.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

# The repository root: this file is model_parallel/testing/device_check.py.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The library's packages: the code the discipline applies to (entry points, tests and the
# virtual environment are not in it).
LIBRARY = tuple(os.path.join(ROOT, name) + os.sep for name in ("data", "eval", "loss", "model_parallel", "training"))
_TORCH = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)
# deepspeed.comm only forwards to torch.distributed: a call through it belongs to its caller.
_FORWARDERS = (_TORCH, os.path.join(os.path.dirname(_TORCH.rstrip(os.sep)), "deepspeed", "comm") + os.sep)

_TENSOR_COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather", "broadcast",
                       "reduce_scatter_tensor", "reduce_scatter", "all_to_all_single", "reduce")
_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


class DeviceDisciplineError(AssertionError):
    """A tensor of the project's reached a collective on the wrong device, or an object collective ran."""


def _caller():
    """The file of the nearest frame outside this module, torch and ``deepspeed.comm``."""
    frame = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != _HERE and not name.startswith(_FORWARDERS):
            return name
        frame = frame.f_back
    return "?"


def _library_lines(limit: int = 4):
    """The library frames on the stack, innermost first, as ``path:line`` joined by " <- "."""
    lines, frame = [], sys._getframe(1)
    while frame is not None and len(lines) < limit:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != _HERE and name.startswith(LIBRARY):
            lines.append(f"{os.path.relpath(name, ROOT)}:{frame.f_lineno}")
        frame = frame.f_back
    return " <- ".join(lines)


class _ProjectDefaultDevice(TorchFunctionMode):
    """Constructors called directly by library code without ``device=`` build on ``device``."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.constructors and kwargs.get("device") is None and _caller().startswith(LIBRARY):
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@contextlib.contextmanager
def one_device(device):
    """Within the block, library tensors made without a device land on ``meta``, and a collective
    whose tensors are not on ``device`` (or any object collective) raises
    :class:`DeviceDisciplineError` naming the collective and the library line behind it."""
    device = torch.device(device)
    originals = {name: getattr(dist, name) for name in _TENSOR_COLLECTIVES + _OBJECT_COLLECTIVES if hasattr(dist, name)}

    def checked(name, original):

        def wrapper(*args, **kwargs):
            where = _library_lines() or "outside the library"
            # DeepSpeed's own first-forward input check broadcasts objects once; the library must not.
            if name in _OBJECT_COLLECTIVES and _caller().startswith(LIBRARY):
                raise DeviceDisciplineError(f"{name} (from {where}) pickles through the device on every call; "
                                            f"use a tensor collective")
            for tensor in _tensors(list(args) + list(kwargs.values())):
                if tensor.device != device:
                    raise DeviceDisciplineError(f"{name} (from {where}) got a tensor on {tensor.device}, "
                                                f"not on the engine's device {device}")
            return original(*args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, checked(name, original))
    try:
        with _ProjectDefaultDevice(torch.device("meta")):
            yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
