"""Run a function on N local ranks and collect what each rank returns (tests, benchmarks).

Each rank runs ``fn(rank, world_size, *args)`` after ``torch.distributed`` is initialised with gloo
(or ``deepspeed.init_distributed`` when ``deepspeed=True``: NCCL where each rank has a GPU, gloo
otherwise; gloo ranks run on DeepSpeed's CPU accelerator and never touch CUDA, so more ranks than
GPUs works, see ``model_parallel.devices``). What it returns (tensors, numbers, strings) comes back
per rank; an exception on any rank fails the test with that rank's traceback, and a group that
does not finish in ``timeout`` seconds is killed, so a hang is a failure, not a stuck CI. ``fn``
must be importable (a module-level function) because ranks are spawned.
"""

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, use_deepspeed, backend, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if use_deepspeed:
            from model_parallel.distributed import init_distributed

            init_distributed(backend=backend)
        else:
            # gloo: DeepSpeed ops that ``fn`` may import later stay off CUDA too.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_on_ranks(world_size, fn, *args, deepspeed=False, timeout=120):
    """``[result of rank 0, result of rank 1, ...]``; raises if any rank failed or the group hung.

    With ``deepspeed=True`` on a machine with a GPU per rank the group is NCCL (each rank on its
    own GPU, as under the launcher); otherwise gloo."""
    from model_parallel.devices import local_group_backend

    backend = local_group_backend(world_size, deepspeed=deepspeed)
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_rank_main,
                                     args=(world_size, free_port(), deepspeed, backend, out_dir, fn, args),
                                     nprocs=world_size,
                                     join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            # join() returns as soon as any rank exits; loop until all have, or the deadline.
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout}s (a hang?)")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        outputs = [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
    errors = [f"rank {rank}:\n{out['error']}" for rank, out in enumerate(outputs) if "error" in out]
    if errors:
        raise AssertionError("\n".join(errors))
    return [out["result"] for out in outputs]
