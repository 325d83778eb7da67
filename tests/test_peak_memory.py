"""training.memory.PeakMemory on CPU: the job's RSS reading follows the live tensors because the job
fixes glibc's mmap threshold itself (nothing needs setting in the environment)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh interpreter: glibc's threshold is per process, and pytest's own allocations move it.
_PROBE = """
import psutil, torch
from training.memory import PeakMemory

PeakMemory(torch.device("cpu"))
rss = lambda: psutil.Process().memory_info().rss
x = torch.ones(4 << 20)  # 16 MiB, freed: glibc's dynamic threshold would now serve this size from its heap
del x
base = rss()
x = torch.ones(4 << 20)  # (4Mi,) fp32, every page touched
grown = rss() - base
del x
print(grown, rss() - base)
"""


def test_freed_tensors_leave_the_rss_the_job_reads():
    """A 16 MiB tensor freed after a first one of that size: its pages go back (RSS within 2 MB of
    before), so peak RSS growth measures tensors, not the heap glibc kept. Fails without the
    job's own mallopt (the heap keeps the 16 MiB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    grown, kept = map(int, result.stdout.split()[-2:])
    assert grown > 15e6, (grown, kept)
    assert kept < 2e6, (grown, kept)
