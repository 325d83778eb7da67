"""Peak memory the job reports on every logged step (``peak_memory_gb``; GB = 10⁹ bytes).

On an accelerator: the peak allocated memory since the previous logged step
(``max_memory_allocated``, reset after each reading). On CPU: the process's peak RSS above its RSS
just before the models were built, so the interpreter and the libraries are not counted; the peak
RSS cannot be reset, so on CPU it is the peak so far. Either way the maximum over all ranks.

On CPU the C library's allocator decides what RSS shows: glibc serves a freed block of up to its
mmap threshold from the heap again and keeps those pages, and it raises that threshold to the
largest block freed so far (up to 32 MiB), so after the first steps every activation-sized tensor
comes from a heap that never shrinks and RSS overstates what is alive. :class:`PeakMemory` fixes
the threshold at 64 KiB in-process (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_=65536``
does from the environment) before the models are built: tensor-sized blocks are mapped and given back
on free, so the reading follows the live tensors, as the caching allocator's counter does on a GPU.
"""

import ctypes
import ctypes.util
import resource

import psutil
import torch
import torch.distributed as dist


M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 65536


def map_large_blocks() -> bool:
    """Make glibc map every block of 64 KiB or more and unmap it on free (``mallopt``; the
    threshold then stays fixed). True where it was set; False on a C library without ``mallopt``
    (musl, macOS), where RSS is read as it comes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError, TypeError):
        return False


class PeakMemory:
    """Create just before the models are built; :meth:`read_gb` on logging steps (collective).
    On CPU it first sets the allocator's mmap threshold (:func:`map_large_blocks`)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.mapped = map_large_blocks() if self.device.type == "cpu" else False
        self.baseline = psutil.Process().memory_info().rss

    def read_gb(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline, 0)  # KiB on Linux
        value = torch.tensor([float(peak)], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item()) / 1e9  # host sync: a logged value
