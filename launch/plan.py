"""Compare the layouts of a distillation job on a cluster before it runs (estimates).

    python -m launch.plan --config FILE [--set key=value ...] [--nodes N --gpus-per-node G [--gpus N*G]
        --gpu-memory-gb M --tflops F --nvlink-gbps B --ib-gbps B --hbm-gbps B] [--as-configured] [--json]
        [--header]

Prints, per GPU, memory by term, bytes handed to collectives per step by kind, a step-time
estimate naming the bottleneck, and the ``--set`` arguments that select the fastest layout that
fits (the job never changes its layout by itself). ``--as-configured`` shows the config's own
layout; ``--json`` prints one JSON object; ``--header`` prints the plan as YAML comment lines (the
production config's header is generated this way). With ``on_policy.fraction`` > 0 the plan adds
the student's generation: its memory terms and ``generation_s``, the expected seconds per step.
Builds the models on the meta device from local configs (launch/configs/models for hub ids): no
weights, no network, no GPU.
"""

import argparse
import json
import sys

from core.cli import run_main
from core.errors import ConfigError
from training.config import load_config

_DEFAULTS = {"nodes": 2, "gpus_per_node": 8, "gpu_memory_gb": 80.0, "tflops": 400.0, "nvlink_gbps": 450.0,
             "ib_gbps": 200.0, "hbm_gbps": 3350.0}


def header(result, command: str) -> str:
    """The plan as the YAML comment block a config opens with."""
    from training.plan import describe

    lines = ["# Layout plan (estimates, generated; do not edit by hand):", f"#   {command}"]
    lines += [f"# {line}" for line in describe(result)]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--nodes", type=int, default=_DEFAULTS["nodes"])
    parser.add_argument("--gpus-per-node", type=int, default=_DEFAULTS["gpus_per_node"])
    parser.add_argument("--gpus", type=int, default=None,
                        help="total GPUs, a check: must equal --nodes x --gpus-per-node")
    parser.add_argument("--gpu-memory-gb", type=float, default=_DEFAULTS["gpu_memory_gb"],
                        help="usable memory per GPU, GB = 1e9 bytes (default 80)")
    parser.add_argument("--tflops", type=float, default=_DEFAULTS["tflops"],
                        help="achieved dense bf16 TFLOP/s per GPU (default 400)")
    parser.add_argument("--nvlink-gbps", type=float, default=_DEFAULTS["nvlink_gbps"],
                        help="NVLink GB/s per GPU, each direction (default 450)")
    parser.add_argument("--ib-gbps", type=float, default=_DEFAULTS["ib_gbps"],
                        help="InfiniBand GB/s per node, each direction (default 200)")
    parser.add_argument("--hbm-gbps", type=float, default=_DEFAULTS["hbm_gbps"],
                        help="GPU memory bandwidth, GB/s (default 3350, an H100 SXM; H200 4800); read only by "
                             "on-policy generation's decode steps")
    parser.add_argument("--as-configured", action="store_true", help="show the config's own layout")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--header", action="store_true", help="print the plan as YAML comment lines")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "gpu_memory_gb", "tflops", "nvlink_gbps", "ib_gbps", "hbm_gbps"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)!r}")
    if args.gpus is not None and args.gpus != args.nodes * args.gpus_per_node:
        raise ConfigError(f"--gpus {args.gpus} does not match --nodes {args.nodes} x --gpus-per-node "
                          f"{args.gpus_per_node} = {args.nodes * args.gpus_per_node}")
    cfg = load_config(args.config, args.overrides)

    from training.plan import Cluster, describe, plan

    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                      tflops=args.tflops, nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps, hbm_gbps=args.hbm_gbps)
    result = plan(cfg, cluster, as_configured=args.as_configured)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    elif args.header:
        shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        sys.stdout.write(header(result, f"python -m launch.plan {shown}"))
    else:
        print("\n".join(describe(result)))
    return 0 if result.chosen is not None else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
