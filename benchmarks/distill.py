"""Tokens/s of the job's layouts beside a plain transformers ``Trainer`` + DDP baseline, in one run.

    python benchmarks/distill.py [--pair {demo,small,wide}] [--ranks 2] [--steps 20] [--warmup 3]
                                 [--seq-len S] [--micro-batch 8] [--tp 1 2] [--stage {0,1,2,3,auto} ...]
                                 [--placement {resident,zero3} ...] [--fused {off,on,both}] [--rounds 3]

The pair (``benchmarks.demo_pair.PAIRS``, random weights, fp32 on CPU with gloo; ``--seq-len``
defaults to the pair's):

- ``demo`` (default): the demo's models, student 64 x 2 layers, teacher 128 x 4, V 1,024, sequence 128;
- ``small``: student 32 x 2, teacher 64 x 4, V 1,024, 64-token sequences (fixed per-step costs dominate);
- ``wide``: student 128 x 2, teacher 256 x 4, V 16,384 real byte-level BPE tokens trained on the demo
  corpus (V = 128 x the student's width, as in real small students), sequence 128: the output
  layers and the logits dominate.

Every side trains the same steps of the same global batch (random ids of the pair's vocabulary)
after the same warm-up and counts the same tokens: every input token of the global batch
(micro-batch x sequence x data-parallel ranks) per optimizer step.

- **baseline**: ``transformers.Trainer`` with DDP, a full teacher copy per rank, the loss the
  plain forward KL over the whole vocabulary (``kl_div(log_softmax)``), AdamW;
- **the job's layouts**: ``training.step.train_step`` (the job's own step: tail-aware divergence
  K 10, beta 2) for each tensor-parallel size x ``parallel.teacher_placement`` x student ZeRO stage
  (``parallel.student_zero_stage``: stage 0 at TP 1 only, a ``zero3`` teacher with stage 3 only;
  ``auto`` resolved as the job resolves it, and the stage it took printed) x ``loss.fused_head``
  where ``--fused`` is given (``off``, ``on`` or ``both``, printed side by side; not given: the key
  is not set). Each job side runs as the job does: ``training.memory.PeakMemory``
  is made before the models are built, which on CPU also fixes glibc's mmap threshold at 64 KiB.

For every job side a step's time is split by part (rank 0's wall clock around the engines' calls,
medians over rounds): teacher forward, student forward, loss/head (the objective's forward; with the
fused head also both output layers, which then leave the forwards), backward (the loss's too),
optimizer, and other = the step minus those parts (batch moves, the token-count all-reduce, host
decisions: the fixed per-step costs). On the wide pair each job side also gives its peak memory
(``peak_memory_gb`` as the job logs it, in GB and in units of L = one micro-batch's student logits
in fp32, ``micro-batch x sequence x V / TP x 4`` bytes).

Every side runs once per round, the rounds one after another, and the medians over rounds are
printed: on a shared machine whose speed drifts by tens of percent between minutes, a side's ratio
to the baseline is taken within each round (paired), and its median and range are shown.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from statistics import median
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.demo_pair import FUSED, PAIRS, fused_override, refused_overrides, write_pair  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("teacher forward", "student forward", "loss/head", "backward", "optimizer")


@dataclass(frozen=True)
class Side:
    """One layout of the job; ``stage`` an int or ``"auto"``, ``fused`` None where ``loss.fused_head`` is not set."""

    tp: int
    placement: str
    stage: object
    fused: Optional[bool] = None

    def overrides(self) -> list:
        values = [f"parallel.tensor_parallel={self.tp}", f"parallel.teacher_placement={self.placement}",
                  f"parallel.student_zero_stage={self.stage}"]
        return values + fused_override(self.fused)

    def name(self, ranks: int) -> str:
        fused = "" if self.fused is None else f", fused head {'on' if self.fused else 'off'}"
        return (f"job: TP {self.tp} x DP {ranks // self.tp}, teacher {self.placement}, student ZeRO-{self.stage}"
                f"{fused}")


def _global_batches(args):
    """The same global batches for every side: ``warmup + steps`` tensors ``[G, S]`` of token ids
    (past the 4 special ids), G = micro-batch x processes sequences (each side splits G over its
    data-parallel ranks)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(args.warmup + args.steps):
        yield torch.randint(4, PAIRS[args.pair].vocab, (args.micro_batch * args.ranks, args.seq_len),
                            generator=generator)


def _job_config(work, args, side: Side):
    from training.config import load_config

    micro = args.micro_batch * side.tp  # the same global batch on world_size / tp data-parallel ranks
    overrides = [f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", f"student.config={work}/student.json",
                 "loss.kind=tail", f"train.micro_batch_size={micro}", "train.grad_accum=1", f"data.train={work}",
                 f"output_dir={work}/out"] + side.overrides()
    return load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), overrides)


def _job_worker(rank, world_size, work, args, side: Side):
    from model_parallel.distributed import accelerator_device
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.memory import PeakMemory
    from training.step import train_step

    cfg = _job_config(work, args, side)
    if side.stage == "auto":  # the job resolves it before building anything; so does this side
        from training.auto_stage import resolve_auto_stage

        cfg, _ = resolve_auto_stage(cfg, world_size=world_size, bf16=False, device=accelerator_device())
    micro = cfg.train.micro_batch_size
    memory = PeakMemory(accelerator_device())  # as the job makes it: before the models
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                            bf16=False)
    timings = _split_timings(engines)
    seconds = 0.0
    for step, ids in enumerate(_global_batches(args)):
        ids = ids[engines.dp_rank * micro:(engines.dp_rank + 1) * micro]  # (micro, S): this rank's share
        if step == args.warmup:
            timings.clear()
        batch = {"input_ids": ids, "labels": ids.clone()}  # full rows: no mask, as the job's collator
        started = time.perf_counter()
        train_step(engines, cfg.loss, [batch])  # ends with its host sync
        if step >= args.warmup:
            seconds += time.perf_counter() - started
    tokens = args.steps * args.micro_batch * args.ranks * args.seq_len  # every input token of the global batch
    split = {part: timings.get(part, 0.0) / args.steps for part in PARTS}
    split["other"] = seconds / args.steps - sum(split.values())
    logits_bytes = micro * args.seq_len * engines.vocab_size // side.tp * 4  # L: fp32 student logits, one micro-batch
    peak_gb = memory.read_gb()  # collective: every rank reads
    engines.student.destroy()
    if engines.teacher is not None:
        engines.teacher.destroy()
    return {"tokens_per_s": tokens / seconds, "split": split, "seconds_per_step": seconds / args.steps,
            "peak_gb": peak_gb, "L_gb": logits_bytes / 1e9, "stage": cfg.parallel.student_zero_stage}


def _split_timings(engines):
    """Wrap the engines' calls and the step's objective to time where a step goes (rank-local wall
    clock, seconds per part, summed over calls). Each part's time is exclusive: with the fused head the
    objective runs inside the student's forward (``training.fused_head``), and counts as loss/head only.
    Timed from outside: ``train_step`` has no per-part hook."""
    timings, inner = {}, []  # inner: per open call, the time its nested timed calls took

    def timed(name, function):

        def wrapper(*args, **kwargs):
            inner.append(0.0)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                timings[name] = timings.get(name, 0.0) + elapsed - inner.pop()
                if inner:
                    inner[-1] += elapsed

        return wrapper

    import training.step as step_module

    student = engines.student
    student.forward = timed("student forward", student.forward)
    student.backward = timed("backward", student.backward)
    student.step = timed("optimizer", student.step)
    if engines.teacher is not None:
        engines.teacher.forward = timed("teacher forward", engines.teacher.forward)
    for objective in ("distillation_objective", "fused_objective"):  # unfused; fused (both output layers inside)
        if hasattr(step_module, objective):
            setattr(step_module, objective, timed("loss/head", getattr(step_module, objective)))
    return timings


def _trainer_worker(rank, world_size, work, args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"{work}/student.json"))
    teacher = AutoModelForCausalLM.from_pretrained(f"{work}/teacher").eval().requires_grad_(False)
    # Every global batch's rows in order; the sequential sampler's batches of micro_batch rows go to
    # the ranks in turn (accelerate's BatchSamplerShard), so rank r trains on rows r*m:(r+1)*m of each.
    rows = torch.cat(list(_global_batches(args)))  # (steps * G, S)

    class Rows(torch.utils.data.Dataset):

        def __len__(self):
            return rows.shape[0]

        def __getitem__(self, index):
            return {"input_ids": rows[index]}

    class KDTrainer(Trainer):

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"], use_cache=False).logits
            with torch.no_grad():
                target = teacher(input_ids=inputs["input_ids"], use_cache=False).logits
            loss = torch.nn.functional.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True,
                                              reduction="batchmean")
            return loss

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):

        def __init__(self):
            self.started, self.seconds = None, 0.0

        def on_step_begin(self, arguments, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step > args.warmup:
                self.seconds += time.perf_counter() - self.started

    clock = Clock()
    arguments = TrainingArguments(output_dir=f"{work}/trainer{rank}", per_device_train_batch_size=args.micro_batch,
                                  max_steps=args.warmup + args.steps, learning_rate=3e-3, use_cpu=True,
                                  logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0,
                                  ddp_backend="gloo", disable_tqdm=True, remove_unused_columns=False, seed=0)
    KDTrainer(model=student, args=arguments, train_dataset=Rows(), callbacks=[clock]).train()
    tokens = args.steps * args.micro_batch * args.ranks * args.seq_len
    return {"tokens_per_s": tokens / clock.seconds, "seconds_per_step": clock.seconds / args.steps}


def _run_side(name, ranks, worker, *args, deepspeed=False, attempts=3):
    """Rank 0's result of one side; a side whose processes crash (seen here: the Trainer's gloo
    threads aborting at exit, once in a few dozen runs) is run again, and the retry is reported.
    An error raised in a rank or a hang is not retried: it fails the benchmark at once."""
    from torch.multiprocessing import ProcessExitedException

    from model_parallel.spawn import run_on_ranks

    for attempt in range(1, attempts + 1):
        try:
            return run_on_ranks(ranks, worker, *args, deepspeed=deepspeed, timeout=1800)[0]
        except ProcessExitedException as error:  # killed by a signal or exited without its result
            if attempt == attempts:
                raise
            print(f"'{name}' failed ({error!r}); running it again", file=sys.stderr, flush=True)


def _sides(args) -> list:
    """The job's layouts to time: TP x placement x stage x fused, fused variants of a layout adjacent.
    ZeRO stage 0 (plain data parallelism) is an fp32, TP-1 layout (training.deepspeed_config.stage_problem);
    a ``zero3`` teacher is timed beside a ZeRO-3 student only (the layout before ``teacher_placement``)."""
    return [Side(tp, placement, stage, fused) for tp in args.tp for placement in args.placement for stage in args.stage
            if (stage != 0 or tp == 1) and (placement == "resident" or stage == 3) for fused in FUSED[args.fused]]


def _stage(value: str):
    return value if value == "auto" else int(value)


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="demo", help="benchmarks.demo_pair.PAIRS")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the pair's (demo 128, small 64, wide 128)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stage", type=_stage, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3, "auto"],
                        help="parallel.student_zero_stage values")
    parser.add_argument("--placement", nargs="+", default=["resident", "zero3"], choices=["resident", "zero3"],
                        help="parallel.teacher_placement values (zero3 with stage 3 only)")
    parser.add_argument("--fused", choices=["off", "on", "both"], default=None,
                        help="loss.fused_head false / true / both side by side (default: not set)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every side, interleaved (medians reported)")
    args = parser.parse_args()
    args.seq_len = args.seq_len or PAIRS[args.pair].seq_len
    sides = _sides(args)
    if not sides:
        parser.error("no layout: stage 0 needs TP 1, a zero3 teacher needs stage 3")
    refused = refused_overrides(override for side in sides for override in side.overrides())
    if refused:
        parser.error("this checkout's config refuses " + "; ".join(refused))
    return args, sides


def _report(args, runs: dict, baseline: str) -> None:
    pair = PAIRS[args.pair]
    print(f"{args.pair} pair: teacher {pair.teacher[0]} x {pair.teacher[1]} layers -> student {pair.student[0]} x "
          f"{pair.student[1]}, V {pair.vocab:,} ({pair.tokenizer} tokenizer); {args.ranks} processes (gloo, CPU), "
          f"micro-batch {args.micro_batch} x {args.seq_len}, {args.steps} timed steps after {args.warmup} (rank 0), "
          f"medians of {args.rounds} interleaved rounds")
    width = max(len(name) for name in runs)
    print(f"  {'side':<{width}}  {'s/step':>8}  {'tokens/s':>9}  {'x baseline':>10}  {'range':>11}")
    # Paired: each round's ratio to the baseline of the same round.
    ratios = {name: [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(results, runs[baseline])]
              for name, results in runs.items()}
    for name, results in runs.items():
        print(f"  {name:<{width}}  {median([r['seconds_per_step'] for r in results]):>8.4f}  "
              f"{median([r['tokens_per_s'] for r in results]):>9.0f}  {median(ratios[name]):>10.2f}  "
              f"{min(ratios[name]):>5.2f}-{max(ratios[name]):<5.2f}")
    jobs = {name: results for name, results in runs.items() if name != baseline}
    for name, results in jobs.items():
        if "ZeRO-auto" in name:
            print(f"  {name}: auto took ZeRO-{'/'.join(str(s) for s in sorted({r['stage'] for r in results}))}")
    print("where a job step goes (s, medians over rounds; other = the step minus the parts):")
    print(f"  {'side':<{width}}  " + "  ".join(f"{part:>15}" for part in PARTS + ("other",)))
    for name, results in jobs.items():
        print(f"  {name:<{width}}  " + "  ".join(f"{median([r['split'][part] for r in results]):>15.4f}"
                                                for part in PARTS + ("other",)))
    if args.pair == "wide":
        L = next(iter(jobs.values()))[0]["L_gb"]
        print(f"peak memory per rank (peak_memory_gb as the job logs it, max over ranks, medians; L = {L:.4f} GB):")
        for name, results in jobs.items():
            peak = median([r["peak_gb"] for r in results])
            print(f"  {name:<{width}}  {peak:>8.3f} GB  {peak / results[0]['L_gb']:>7.2f} L")


def main():
    args, sides = _arguments()
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    baseline = "baseline: Trainer + DDP, teacher per rank, full-vocabulary KL"
    runs = {name: [] for name in [baseline] + [side.name(args.ranks) for side in sides]}  # one result per round
    with tempfile.TemporaryDirectory() as work:
        write_pair(args.pair, work)
        for round_index in range(args.rounds):
            print(f"round {round_index + 1} of {args.rounds}", file=sys.stderr, flush=True)
            runs[baseline].append(_run_side(baseline, args.ranks, _trainer_worker, work, args))
            for side in sides:
                name = side.name(args.ranks)
                runs[name].append(_run_side(name, args.ranks, _job_worker, work, args, side, deepspeed=True))
    _report(args, runs, baseline)


if __name__ == "__main__":
    main()
