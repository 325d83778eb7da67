"""Start torch.distributed through DeepSpeed, without leaving shared memory behind.

On the CPU accelerator, DeepSpeed 0.19.8's shm all-reduce maps one 69 MB file per rank,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never unlinks it: every
run, killed or not, leaves them in ``/dev/shm`` (RAM) until the machine fills up. Once every
rank has mapped every other rank's buffer (``init_distributed`` returns only then), a barrier
later each rank unlinks its own name; the mappings stay valid until the process exits, so
nothing is left even after a SIGKILL.
"""

import glob
import os
import sys
import time
from datetime import timedelta

SHM_DIR = "/dev/shm"
# A JIT build of DeepSpeed's ops takes about a minute here; a lock this old with no build running
# on this node was most likely left by a killed launch.
STALE_LOCK_S = 300


def shm_buffer_path(rank: int) -> str:
    """The buffer DeepSpeed's shm comm op creates for ``rank`` (named as in its shm.cpp)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def accelerator_device():
    """The ``torch.device`` this rank computes on (DeepSpeed's accelerator: ``cuda:<local rank>``, ``cpu``)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def extension_build_locks() -> list:
    """The lock files of torch's JIT extension builds (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    # <root>/<extension>/lock, or <root>/<py311_cu124 or similar>/<extension>/lock by default.
    return sorted(glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")))


def _building_here(build_dir: str) -> bool:
    """Whether a process on this node works in ``build_dir`` (ninja and the compilers run there)."""
    import psutil

    build_dir = os.path.realpath(build_dir)
    for process in psutil.process_iter(["cwd", "cmdline"]):
        cwd, cmdline = process.info.get("cwd"), process.info.get("cmdline") or []
        if (cwd and os.path.realpath(cwd).startswith(build_dir)) or any(build_dir in arg for arg in cmdline):
            return True
    return False


def stale_build_locks(max_age_s: float = STALE_LOCK_S) -> list:
    """Messages for the extension build locks older than ``max_age_s`` with no build alive on this
    node: torch's lock names no owner and waits on it forever, and a shared cache may be in use by
    another node, so the lock is never removed here; the user is told how."""
    messages = []
    for lock in extension_build_locks():
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            continue  # released meanwhile
        if age < max_age_s or _building_here(os.path.dirname(lock)):
            continue
        messages.append(f"warning: {lock} is a torch extension build lock {age / 60:.0f} min old and no build runs "
                        f"on this node (a killed first launch?); unless another node sharing this cache is building "
                        f"{os.path.basename(os.path.dirname(lock))} now, remove it: rm {lock}")
        messages.append(f"waiting for {lock} to be removed: torch waits on it before it builds or loads "
                        f"{os.path.basename(os.path.dirname(lock))}")
    return messages


def init_distributed(timeout_s: float = None, backend: str = None) -> None:
    """``deepspeed.init_distributed`` (``backend``, else NCCL on GPUs and gloo on CPU), then release
    the shm buffer. A stale JIT build lock, which would make that wait forever, is reported first
    (once per node).

    The rank's device is decided before DeepSpeed is imported (:mod:`model_parallel.devices`): an
    NCCL rank binds GPU ``LOCAL_RANK``, and one without a GPU of its own raises
    :class:`core.errors.UserError` (one line) on every rank of the node before the rendezvous; a
    gloo rank uses DeepSpeed's CPU accelerator and never touches CUDA, so a machine with fewer
    GPUs than ranks runs gloo groups (DeepSpeed's shm comm op, C++ only, may build on first use).
    """
    import torch.distributed as dist

    from model_parallel.devices import bind, decide_rank_device, local_world_size

    device = decide_rank_device(int(os.environ.get("LOCAL_RANK", "0")), backend, ranks_on_node=local_world_size())
    bind(device)  # before `import deepspeed`: DeepSpeed fixes its accelerator at import
    import deepspeed

    if os.environ.get("LOCAL_RANK", "0") == "0":
        for message in stale_build_locks():
            print(message, file=sys.stderr, flush=True)

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend=device.backend, verbose=False, **kwargs)
    dist.barrier()  # every rank has opened every buffer it needs
    path = shm_buffer_path(dist.get_rank())
    if os.path.exists(path):
        os.unlink(path)


def decided_on_rank_0(what: str, decide, *, unexpected=None):
    """Rank 0 runs ``decide()`` (a file-system decision worth making once); every rank returns its
    answer or raises the same :class:`core.errors.UserError`. An unexpected error on rank 0 is
    reported too (its traceback printed there, then as ``unexpected``, a ``UserError`` class, on
    every rank), so the other ranks never wait for an answer that will not come. Collective."""
    import traceback

    import torch.distributed as dist

    from core.errors import UserError

    answer = [None, None, None]
    if dist.get_rank() == 0:
        try:
            answer[0] = decide()
        except UserError as error:
            answer[1:] = [type(error), str(error)]
        except Exception as error:  # noqa: BLE001 -- see the docstring
            traceback.print_exc()
            answer[1:] = [unexpected or UserError, f"{what} failed: {error!r}"]
    dist.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise answer[1](answer[2])
    return answer[0]


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
