"""Convert a checkpoint to DeepSpeed's universal format, to resume it on another TP x DP layout.

    python -m launch.convert_universal CKPT_DIR [TAG]

CKPT_DIR is a run's ``checkpoints`` directory; TAG defaults to the one ``latest`` names. The tag
is verified against its manifest, then written beside it as ``<TAG>_universal``. ``launch.distill``
does the same by itself when it resumes on another layout and reuses a conversion made here, so
running this first only moves the work (minutes for a 1B student) off the job's start.
"""

import argparse
import os
import sys

from core.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.convert_universal", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", metavar="CKPT_DIR", help="a run's checkpoints directory")
    parser.add_argument("tag", metavar="TAG", nargs="?", help="step_<N> tag in CKPT_DIR (default: latest)")
    parser.add_argument("--workers", type=int, default=1, help="processes for extracting and merging shards")
    args = parser.parse_args(argv)
    from training import checkpoint, universal

    root = os.path.abspath(args.checkpoints)
    if args.tag:
        checkpoint.verify(root, args.tag)
        tag = args.tag
    else:
        _, tag = checkpoint.find_resume(root, default_root=root)
    target = universal.convert(root, tag, workers=args.workers)
    print(os.path.join(root, target))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
