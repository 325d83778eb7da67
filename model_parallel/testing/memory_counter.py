"""Count the bytes of tensors allocated and alive during a block, for tests and benchmarks.

A ``TorchDispatchMode`` sees every op's outputs; each new storage is counted while it is alive (a
finalizer on the storage subtracts it when freed), so ``peak_bytes`` is the most memory the
block's own tensors held at once: activations, logits, gradients, temporaries. Tensors that
existed before the block (parameters, optimizer state) are not counted, nor are allocations that
bypass the dispatcher. Deterministic for a given program, unlike RSS or allocator statistics.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as counted: ...`` → ``counted.peak_bytes``, ``counted.live_bytes``."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked = {}

    def _free(self, key):
        self.live_bytes -= self._tracked.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._tracked:
            return
        self._tracked[key] = storage.nbytes()
        self.live_bytes += self._tracked[key]
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or in-place result shares an input's storage: not a new allocation (a parameter's
        # ``.t()`` inside a matmul would otherwise count the parameter, made before the block).
        inputs = {value.untyped_storage()._cdata for value in tree_flatten((args, kwargs))[0]
                  if isinstance(value, torch.Tensor) and value.device.type != "meta"}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and (value.device.type == "meta" or
                                                    value.untyped_storage()._cdata not in inputs):
                self._track(value)
        return out
