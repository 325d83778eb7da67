"""Cost of a distillation step next to a student-only CE step, on the demo's model sizes.

    python benchmarks/step_cost.py [--ranks 2] [--tp 2] [--steps 10] [--seq-len 128] [--micro-batch 8]

Builds the demo teacher (random weights) and student (launch/configs/models/demo_*.json) as ZeRO-3 +
AutoTP engines on local gloo ranks, then times, per optimizer step: the teacher's forward, the
student's forward, the loss (tail-aware divergence on vocabulary slices) forward+backward through
the student, and the optimizer step; then the same student trained with plain CE. Prints tokens/s
and the split, and the target ratio: distillation step / (CE step + teacher forward) <= 1.10.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(timings, name, fn):
    start = time.perf_counter()
    result = fn()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return result


def _worker(rank, world_size, work, args):
    import torch

    from loss.objective import distillation_objective
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources

    results = {}
    for kind in ("tail", "ce"):
        overrides = [f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", f"loss.kind={kind}",
                     f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
                     f"parallel.tensor_parallel={args.tp}", f"data.train={work}", f"output_dir={work}/out"]
        cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), overrides)
        engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                                bf16=False)
        generator = torch.Generator().manual_seed(0)
        timings, tokens = {}, 0
        for step in range(args.steps + 1):
            if step == 1:  # the first step warms up allocators and ZeRO-3's parameter fetch order
                timings, tokens = {}, 0
            ids = torch.randint(4, 1000, (args.micro_batch, args.seq_len), generator=generator)
            teacher = None
            if engines.teacher is not None:
                with torch.no_grad():
                    teacher = _timed(timings, "teacher forward", lambda: engines.teacher(input_ids=ids).logits)
                teacher = teacher[:, :-1].reshape(-1, teacher.shape[-1])
            logits = _timed(timings, "student forward", lambda: engines.student(input_ids=ids).logits)
            student = logits[:, :-1].reshape(-1, logits.shape[-1])
            out = _timed(timings, "loss forward", lambda: distillation_objective(
                student, teacher, ids[:, 1:].reshape(-1), kind=kind, top_k=10, beta=2.0, tp_group=engines.tp_group))
            _timed(timings, "backward", lambda: engines.student.backward(out["loss"].mean()))
            _timed(timings, "optimizer", engines.student.step)
            tokens += student.shape[0]
        results[kind] = {"timings": timings, "tokens": tokens}
        engines.student.destroy()
        if engines.teacher is not None:
            engines.teacher.destroy()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()

    from benchmarks.demo_pair import save_random_teacher
    from model_parallel.spawn import run_on_ranks

    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    with tempfile.TemporaryDirectory() as work:
        save_random_teacher(f"{work}/teacher")
        results = run_on_ranks(args.ranks, _worker, work, args, deepspeed=True, timeout=1800)[0]

    print(f"demo teacher -> demo student, {args.ranks} gloo ranks, TP={args.tp}, micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens, {args.steps} timed steps (rank 0, seconds per step)")
    names = ("teacher forward", "student forward", "loss forward", "backward", "optimizer")
    print(f"  {'step':<22}" + "".join(f"{n:>17}" for n in names) + f"{'total':>10}{'tokens/s':>11}")
    per_step = {}
    for kind, label in (("tail", "distillation (tail)"), ("ce", "student only (CE)")):
        timings = {n: results[kind]["timings"].get(n, 0.0) / args.steps for n in names}
        per_step[kind] = sum(timings.values())
        per_step[f"{kind} teacher"] = timings["teacher forward"]
        rate = results[kind]["tokens"] / (per_step[kind] * args.steps)
        print(f"  {label:<22}" + "".join(f"{timings[n]:>17.4f}" for n in names) + f"{per_step[kind]:>10.4f}"
              f"{rate:>11.0f}")
    budget = per_step["ce"] + per_step["tail teacher"]
    print(f"\ndistillation step / (CE step + teacher forward) = {per_step['tail'] / budget:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
