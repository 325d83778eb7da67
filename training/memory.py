"""Peak memory the job reports on every logged step (``peak_memory_gb``; GB = 10⁹ bytes).

On an accelerator: the peak allocated memory since the previous logged step
(``max_memory_allocated``, reset after each reading). On CPU: the process's peak RSS above its RSS
just before the models were built, so the interpreter and the libraries are not counted; the peak
RSS cannot be reset, so on CPU it is the peak so far. Either way the maximum over all ranks.
"""

import resource

import psutil
import torch
import torch.distributed as dist


class PeakMemory:
    """Create just before the models are built; :meth:`read_gb` on logging steps (collective)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
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
