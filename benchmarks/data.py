"""Throughput of data.prepare on the embedded demo corpus.

    python benchmarks/data.py [--mb 4] [--seq-len 512] [--procs 1 2]

Generates the demo corpus (``data.synthetic``), trains the demo tokenizer on it, then times
``data.prepare --format text`` (tokenize, block, save) with each process count and prints tokens/s.
Each run uses a fresh datasets cache, so nothing is served from a previous run; the best of
``--repeats`` runs is reported (the first pays one-time start-up costs).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402

from data.prepare import prepare  # noqa: E402
from data.synthetic import generate  # noqa: E402
from data.tokenizer import train_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="size of the demo corpus (default 4 MB)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to time")
    parser.add_argument("--repeats", type=int, default=2, help="runs per process count; the best is reported")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as work:
        generate(os.path.join(work, "demo"), megabytes=args.mb, sft_examples=100)
        corpus = os.path.join(work, "demo", "pretrain", "train.txt")
        train_tokenizer([corpus], os.path.join(work, "tok"), vocab_size=args.vocab_size)
        print(f"data.prepare --format text on {os.path.getsize(corpus) / 1e6:.1f} MB of demo text, "
              f"seq_len {args.seq_len}, vocabulary {args.vocab_size}")
        for procs in args.procs:
            seconds = float("inf")
            for repeat in range(args.repeats):
                # A fresh cache per run: no tokenization is served from an earlier one.
                datasets.config.HF_DATASETS_CACHE = os.path.join(work, f"cache-{procs}-{repeat}")
                start = time.perf_counter()
                counts = prepare(os.path.join(work, "tok"), [corpus], os.path.join(work, f"out-{procs}"), fmt="text",
                                 seq_len=args.seq_len, num_proc=procs)
                seconds = min(seconds, time.perf_counter() - start)
            print(f"  num_proc={procs}: {counts['tokens']:,} tokens in {seconds:.2f} s = "
                  f"{counts['tokens'] / seconds:,.0f} tokens/s ({counts['blocks']} blocks)")


if __name__ == "__main__":
    main()
