"""Run the distillation job with the host syncs of each optimizer step counted by CUDA itself.

    python benchmarks/sync_count.py --syncs-out DIR --config FILE [--set key=value ...]     (one rank)
    deepspeed --num_gpus N benchmarks/sync_count.py --syncs-out DIR --config FILE ...      (N ranks)

Everything but ``--syncs-out`` goes to ``launch.distill`` unchanged. Without a launcher (no ``RANK``
in the environment) it runs as the launcher's single rank would. ``torch.cuda.set_sync_debug_mode
("warn")`` makes torch warn at the calls that make the host wait for the GPU through c10's
synchronising copy or stream wait (``.item()``, ``.cpu()`` and other device-to-host copies,
``nonzero``, a boolean-mask index, ...; not ``torch.cuda.synchronize()``, CUDA events, or waits
inside NCCL or a third-party extension, which the mode does not see); the mode is
on during each call of ``training.step.train_step`` (one optimizer step: every micro-batch's teacher
and student forward, loss and backward, and DeepSpeed's step) and the warnings are counted, not
shown. A logging step reads its metrics after ``train_step``, so the counts are those of a step that
logs nothing. Each rank writes ``DIR/host_syncs_rank<r>.json``: ``{"mode", "world_size", "steps":
[count per step], "sites": {"file:line": count}}``, sites being the Python line that made the call.
Without CUDA nothing can be counted: ``mode`` is ``"off (no CUDA)"`` and every count 0.
"""

import argparse
import collections
import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The text of the warning torch's sync debug mode raises (c10/cuda/CUDAFunctions.h, warn_or_error_on_sync).
SYNC_WARNING = "called a synchronizing CUDA operation"


class SyncCounter:
    """Counts sync warnings per call of a wrapped function. ``set_mode`` is
    ``torch.cuda.set_sync_debug_mode`` (``None`` without CUDA: the counts stay 0)."""

    def __init__(self, set_mode=None):
        self.set_mode = set_mode
        self.steps, self.sites = [], collections.Counter()

    def wrap(self, step_fn):
        def counted(*args, **kwargs):
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")  # every sync, not the first per line
                    if self.set_mode:
                        self.set_mode("warn")
                    try:
                        return step_fn(*args, **kwargs)
                    finally:
                        if self.set_mode:
                            self.set_mode("default")
            finally:
                syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
                self.steps.append(len(syncs))
                self.sites.update(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
                for w in caught:  # the step's other warnings, through the filters as if never caught
                    if SYNC_WARNING not in str(w.message):
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

        return counted

    def as_dict(self, world_size: int) -> dict:
        return {"mode": "warn" if self.set_mode else "off (no CUDA)", "world_size": world_size,
                "steps": self.steps, "sites": dict(self.sites.most_common())}


def _short(path: str) -> str:
    """``path`` relative to the project, or from its installed package down (``deepspeed/...``)."""
    if path.startswith(ROOT + os.sep):
        return os.path.relpath(path, ROOT)
    parts = path.split(os.sep)
    return os.sep.join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--syncs-out", required=True, help="directory for host_syncs_rank<r>.json")
    args, distill_argv = parser.parse_known_args(argv)
    if "RANK" not in os.environ:  # the one rank a launcher would start
        from model_parallel.spawn import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    import torch

    from core.cli import run_main
    from launch.distill import main as distill
    from training import job

    counter = SyncCounter(torch.cuda.set_sync_debug_mode if torch.cuda.is_available() else None)
    job.train_step = counter.wrap(job.train_step)  # job.run looks it up in its module at each step
    try:
        return run_main(distill, distill_argv)
    finally:
        os.makedirs(args.syncs_out, exist_ok=True)
        rank = int(os.environ["RANK"])
        with open(os.path.join(args.syncs_out, f"host_syncs_rank{rank}.json"), "w") as out:
            json.dump(counter.as_dict(int(os.environ["WORLD_SIZE"])), out, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # run as a script (by the launcher too): the project's packages
    from model_parallel.distributed import exit_now

    exit_now(main())
