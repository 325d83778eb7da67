"""Export a checkpointed student as a Hugging Face model directory.

    python -m launch.export CHECKPOINT_DIR OUT_DIR

CHECKPOINT_DIR is a run's ``checkpoints`` directory (its ``latest`` tag is used) or one tag in it
(``.../checkpoints/step_400``). The run's ``config.yaml`` (beside ``checkpoints``) and the tag's
``layout.json`` say how the student was built and sharded; the export starts that many local
ranks (NCCL where the machine has a GPU for each, else gloo on the CPU: a 16-rank checkpoint
exports on one 8-GPU node), loads the shards, gathers ZeRO-3 partitions and tensor-parallel
slices, and writes ``config.json``, ``model.safetensors`` and the tokenizer to OUT_DIR.
"""

import argparse
import os
import sys

from core.cli import run_main
from core.errors import ConfigError


def _export_worker(rank, world_size, config_path, root, tag, out_dir, bf16):
    from training import checkpoint
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.export import export_student

    cfg = load_config(config_path)
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, bf16), bf16=bf16,
                            teacher_weights=False)
    checkpoint.load(engines.student, root, tag)
    export_student(engines.student, engines.tokenizer, out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's checkpoints directory, or one step_<N> tag inside it")
    parser.add_argument("out", help="output Hugging Face model directory")
    args = parser.parse_args(argv)
    from training import checkpoint

    root, tag = checkpoint.find_resume(os.path.abspath(args.checkpoint), default_root="")
    config_path = os.path.join(os.path.dirname(root), "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path} is missing: launch.export needs the run's resolved config")
    layout = checkpoint.read_layout(root, tag)
    from model_parallel.spawn import run_on_ranks

    run_on_ranks(layout["world_size"], _export_worker, config_path, root, tag, os.path.abspath(args.out),
                 layout["bf16"], deepspeed=True, timeout=3600)
    print(f"exported {os.path.join(root, tag)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
