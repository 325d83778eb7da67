"""Start torch.distributed through DeepSpeed, without leaving shared memory behind.

On the CPU accelerator, DeepSpeed 0.19.8's shm all-reduce maps one 69 MB file per rank,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never unlinks it: every
run, killed or not, leaves them in ``/dev/shm`` (RAM) until the machine fills up. Once every
rank has mapped every other rank's buffer (``init_distributed`` returns only then), a barrier
later each rank unlinks its own name; the mappings stay valid until the process exits, so
nothing is left even after a SIGKILL.
"""

import os
from datetime import timedelta

SHM_DIR = "/dev/shm"


def shm_buffer_path(rank: int) -> str:
    """The buffer DeepSpeed's shm comm op creates for ``rank`` (named as in its shm.cpp)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def init_distributed(timeout_s: float = None, backend: str = None) -> None:
    """``deepspeed.init_distributed`` (``backend``, else NCCL on GPUs and gloo on CPU), then release
    the shm buffer."""
    import deepspeed
    import torch
    import torch.distributed as dist

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kwargs)
    dist.barrier()  # every rank has opened every buffer it needs
    path = shm_buffer_path(dist.get_rank())
    if os.path.exists(path):
        os.unlink(path)


def exit_now(code: int) -> None:
    """End a rank's process with ``code`` once its work is written, skipping interpreter teardown.

    Even after ``destroy_process_group``, gloo's worker threads can still own work objects that
    hold tensors; destroying them while the interpreter finalises aborts the process ("terminate
    called without an active exception", exit -6), and the launcher then reports a finished run
    as failed. Everything the job writes is closed before this point, so nothing is lost.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
