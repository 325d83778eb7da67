"""Distil a teacher into a student with DeepSpeed (ZeRO-3, AutoTP, vocabulary-parallel loss).

    deepspeed --num_gpus N --module launch.distill --config FILE [--set key=value ...]
    deepspeed --hostfile H --module launch.distill --config FILE ...        (multi-node)
    torchrun --nproc_per_node N -m launch.distill --config FILE ...

``--set`` values are YAML scalars (``student.path=null`` clears a key). Config and data errors are
one line on stderr and exit code 2, before any model is built.
"""

import argparse

from core.cli import run_main
from training.config import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch.distill", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. launch/configs/demo_distill.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    import torch

    from model_parallel.distributed import init_distributed

    init_distributed(timeout_s=cfg.parallel.timeout_s)
    from training.job import run

    try:
        run(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from model_parallel.distributed import exit_now

    exit_now(run_main(main))
