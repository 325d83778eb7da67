"""Cost of the tail-aware divergence next to the plain KL it replaces.

    python benchmarks/loss.py [--shapes 1024x32768 128x256000] [--repeats 3] [--threads 2]

Prints, per logits shape (fp32, K = 10, β = 2):
- forward+backward seconds of ``tail_divergence``, ``torch.nn.functional.kl_div(log_softmax…)``
  and DeepSpeed's ``vocab_parallel_kl_div``, with ratios to torch's KL from the same run, and one
  ``exp`` pass over the logits as the floor any fused kernel is bounded by;
- peak memory growth during forward+backward as a multiple of one fp32 logits tensor (each method
  in a fresh process, from its peak RSS, the returned gradient included);
- bytes each rank passes to collectives per token at TP = 2 and 4 (gloo ranks on this machine).
"""

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loss import forward_kl, tail_divergence  # noqa: E402
from model_parallel.testing.comm_counter import count_collective_bytes  # noqa: E402
from model_parallel.spawn import run_on_ranks  # noqa: E402

TOP_K, BETA = 10, 2.0


def _inputs(rows, vocab):
    # Filled in place: no temporary may raise the peak RSS the memory probe starts from.
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.empty(rows, vocab).normal_(0.0, 2.0, generator=generator) for _ in range(2))


def _tail(student, teacher):
    tail_divergence(student, teacher, top_k=TOP_K, beta=BETA).sum().backward()


def _torch_kl(student, teacher):
    torch.nn.functional.kl_div(torch.log_softmax(student, -1),
                               torch.log_softmax(teacher, -1),
                               log_target=True,
                               reduction="none").sum().backward()


def _deepspeed_kl(student, teacher):
    forward_kl(student, teacher).sum().backward()


METHODS = {"tail_divergence": _tail, "torch kl_div": _torch_kl, "deepspeed kl": _deepspeed_kl}


def _seconds(method, student, teacher, repeats):
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up allocators and lazy imports
        leaf = student.detach().requires_grad_(True)
        start = time.perf_counter()
        method(leaf, teacher)
        best = min(best, time.perf_counter() - start)
    return best


def _exp_pass_seconds(logits, repeats):
    out = torch.empty_like(logits)  # preallocated: the pass itself, not first-touch page faults
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.exp(logits, out=out)
        best = min(best, time.perf_counter() - start)
    return best


def _peak_rss_bytes():
    # VmHWM belongs to this address space: unlike getrusage's ru_maxrss it does not inherit the
    # high-water mark of the parent that spawned the probe.
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _memory_probe(name, rows, vocab):
    """Run in a fresh process: peak RSS growth of one forward+backward, in logits tensors."""
    student, teacher = _inputs(rows, vocab)
    leaf = student.requires_grad_(True)
    # One small call first: imports and one-time buffers are not the loss's per-call memory.
    METHODS[name](*(x.requires_grad_(i == 0) for i, x in enumerate(_inputs(4, 1024))))
    before = _peak_rss_bytes()
    METHODS[name](leaf, teacher)
    print((_peak_rss_bytes() - before) / (rows * vocab * 4))


def _memory_growth(name, rows, vocab):
    output = subprocess.run([sys.executable, __file__, "--memory-probe", name, f"{rows}x{vocab}"],
                            check=True,
                            capture_output=True,
                            text=True,
                            env={
                                **os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())
                            })
    return float(output.stdout.strip().splitlines()[-1])


def _bytes_worker(rank, world_size, vocab, rows):
    local = vocab // world_size + (1 if rank < vocab % world_size else 0)
    generator = torch.Generator().manual_seed(rank)
    student = torch.randn(rows, local, generator=generator).requires_grad_(True)
    teacher = torch.randn(rows, local, generator=generator)
    with count_collective_bytes() as forward:
        value = tail_divergence(student, teacher, top_k=TOP_K, beta=BETA, tp_group=torch.distributed.group.WORLD)
    with count_collective_bytes() as backward:
        value.sum().backward()
    return forward.total_bytes / rows, forward.total_calls, backward.total_calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x32768", "128x256000"], help="ROWSxVOCAB logits shapes")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (best is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-memory", action="store_true", help="skip the per-process peak-memory probes")
    parser.add_argument("--skip-comm", action="store_true", help="skip the multi-process byte counts")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        rows, vocab = map(int, args.memory_probe[1].split("x"))
        return _memory_probe(args.memory_probe[0], rows, vocab)

    print(f"tail_divergence benchmark: fp32 logits, K={TOP_K}, beta={BETA}, {args.threads} threads, "
          f"torch {torch.__version__}")
    for shape in args.shapes:
        rows, vocab = map(int, shape.split("x"))
        student, teacher = _inputs(rows, vocab)
        print(f"\n[{rows} x {vocab}]  one fp32 logits tensor = {rows * vocab * 4 / 2**20:.0f} MiB; "
              f"one exp pass = {_exp_pass_seconds(student, args.repeats) * 1e3:.0f} ms")
        seconds = {name: _seconds(method, student, teacher, args.repeats) for name, method in METHODS.items()}
        growth = {} if args.skip_memory else {name: _memory_growth(name, rows, vocab) for name in METHODS}
        print(f"  {'method':<16} {'fwd+bwd s':>10} {'x torch KL':>11} {'peak mem growth':>16}")
        for name in METHODS:
            memory = f"{growth[name]:.2f}x logits" if name in growth else "-"
            print(f"  {name:<16} {seconds[name]:>10.3f} {seconds[name] / seconds['torch kl_div']:>11.2f} {memory:>16}")
        del student, teacher

    if not args.skip_comm:
        print("\nbytes each rank passes to collectives per token (forward; backward runs none), 64 tokens:")
        for world_size in (2, 4):
            for vocab in (32768, 256000):
                per_token, calls, backward_calls = run_on_ranks(world_size, _bytes_worker, vocab, 64)[0]
                print(f"  TP={world_size} V={vocab:>6}: {per_token:6.1f} B/token in {calls} collectives "
                      f"(backward: {backward_calls}); gathering logits would pass {vocab // world_size * 4 * 2:,} B")


if __name__ == "__main__":
    main()
