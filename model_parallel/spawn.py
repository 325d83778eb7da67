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
import warnings
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp


# Seconds the other ranks get to finish once one rank has failed or every rank has saved its result.
_GRACE_S = 30


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save(out_dir, rank, outcome) -> None:
    # Written whole or not at all: a rank killed while saving leaves no file, never half of one.
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(outcome, path + ".tmp")
    os.replace(path + ".tmp", path)


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
        _save(out_dir, rank, {"result": fn(rank, world_size, *args)})
    except BaseException:
        _save(out_dir, rank, {"error": traceback.format_exc()})
        open(os.path.join(out_dir, f"rank{rank}.failed"), "w").close()  # the parent stops waiting for the others
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _load(out_dir, rank, exitcode) -> dict:
    """What the rank saved. A rank that saved its result and then died (gloo's threads abort at
    interpreter exit once in a few dozen runs: "terminate called without an active exception") did
    its work: the result stands, with a warning. One that saved nothing failed."""
    path = os.path.join(out_dir, f"rank{rank}.pt")
    if not os.path.exists(path):
        return {"error": f"exited with code {exitcode} before saving a result (killed, or crashed in native code)"}
    outcome = torch.load(path, weights_only=False)
    if exitcode != 0 and "result" in outcome:
        warnings.warn(f"rank {rank} saved its result, then exited with code {exitcode} during teardown")
    return outcome


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
        processes = context.processes
        try:
            # Every rank is waited for on its own: a rank that saved its result and then died in
            # teardown must not kill the others before they save theirs (torch's join() would).
            # Once a rank has failed, or every rank has saved, the rest get a short grace period
            # (a rank blocked in teardown on a dead peer would otherwise hold the parent until the deadline).
            settled = False  # a rank failed, or every rank saved: the rest only get the grace period
            while any(p.is_alive() for p in processes):
                if time.monotonic() > deadline:
                    if settled:
                        break
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout}s (a hang?)")
                failed = any(p.exitcode not in (None, 0) or os.path.exists(os.path.join(out_dir, f"rank{r}.failed"))
                             for r, p in enumerate(processes))
                if not settled and (failed or all(
                        os.path.exists(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size))):
                    settled, deadline = True, min(deadline, time.monotonic() + _GRACE_S)
                wait([p.sentinel for p in processes if p.is_alive()], timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        outputs = [_load(out_dir, rank, process.exitcode) for rank, process in enumerate(processes)]
    errors = [f"rank {rank}:\n{out['error']}" for rank, out in enumerate(outputs) if "error" in out]
    if errors:
        raise AssertionError("\n".join(errors))
    return [out["result"] for out in outputs]
