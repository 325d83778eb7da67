"""Tokens/s of the job's layouts beside a plain transformers ``Trainer`` + DDP baseline, in one run.

    python benchmarks/distill.py [--ranks 2] [--steps 20] [--warmup 3] [--seq-len 128] [--micro-batch 8]
                                 [--tp 1 2] [--rounds 3]

The pair is the demo's (launch/configs/models/demo_teacher.json -> demo_student.json, random
weights, 1024-token vocabulary), fp32 on CPU with gloo. Every side trains the same steps of the
same global batch after the same warm-up and counts the same tokens: every input token of the
global batch (micro-batch x sequence x data-parallel ranks) per optimizer step.

- **baseline**: ``transformers.Trainer`` with DDP, a full teacher copy per rank, the loss the
  plain forward KL over the whole vocabulary (``kl_div(log_softmax)``), AdamW;
- **the job's layouts**: ``training.step.train_step`` (the job's own step: tail-aware divergence
  K 10, beta 2) for each tensor-parallel size x ``parallel.teacher_placement``; a layout slower than
  the baseline is shown with where its time goes (teacher forward, student forward, loss,
  backward, optimizer), for each student ZeRO stage (``parallel.student_zero_stage``).

Every side runs once per round, the rounds one after another, and the medians over rounds are
printed: on a shared machine whose speed drifts by tens of percent between minutes, a side's ratio
to the baseline is taken within each round (paired), and its median and range are shown.
"""

import argparse
import os
import sys
import tempfile
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _global_batches(args):
    """The same global batches for every side: ``warmup + steps`` tensors ``[G, S]`` of token ids,
    G = micro-batch x processes sequences (each side splits G over its data-parallel ranks)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(args.warmup + args.steps):
        yield torch.randint(4, 1000, (args.micro_batch * args.ranks, args.seq_len), generator=generator)


def _job_worker(rank, world_size, work, args, tp, placement, stage):
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.step import train_step

    micro = args.micro_batch * tp  # the same global batch on world_size / tp data-parallel ranks
    overrides = [f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", "loss.kind=tail",
                 f"train.micro_batch_size={micro}", "train.grad_accum=1", f"parallel.tensor_parallel={tp}",
                 f"parallel.teacher_placement={placement}", f"parallel.student_zero_stage={stage}",
                 f"data.train={work}", f"output_dir={work}/out"]
    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), overrides)
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
    engines.student.destroy()
    if engines.teacher is not None:
        engines.teacher.destroy()
    return {"tokens_per_s": tokens / seconds, "split": {name: value / args.steps for name, value in timings.items()},
            "seconds_per_step": seconds / args.steps}


def _split_timings(engines):
    """Wrap the engines' calls to time where a step goes (rank-local wall clock, seconds)."""
    timings = {}

    def timed(name, function):

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - started

        return wrapper

    import training.step as step_module

    student = engines.student
    student.forward = timed("student forward", student.forward)
    student.backward = timed("backward", student.backward)
    student.step = timed("optimizer", student.step)
    if engines.teacher is not None:
        engines.teacher.forward = timed("teacher forward", engines.teacher.forward)
    step_module.distillation_objective = timed("loss", step_module.distillation_objective)
    return timings


def _trainer_worker(rank, world_size, work, args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    student_config = AutoConfig.from_pretrained(os.path.join(ROOT, "launch/configs/models/demo_student.json"))
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(student_config)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="runs of every side, interleaved (medians reported)")
    args = parser.parse_args()

    from benchmarks.demo_pair import save_random_teacher

    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    baseline = "baseline: Trainer + DDP, teacher per rank, full-vocabulary KL"
    # ZeRO stage 0 (plain data parallelism) is an fp32, TP-1 layout (training.deepspeed_config.stage_problem).
    layouts = [(tp, placement, stage) for tp in args.tp
               for placement, stage in (("resident", 0), ("resident", 1), ("resident", 2), ("resident", 3),
                                        ("zero3", 3)) if stage or tp == 1]
    sides = [(f"job: TP {tp} x DP {args.ranks // tp}, teacher {placement}, student ZeRO-{stage}",
              (tp, placement, stage)) for tp, placement, stage in layouts]
    runs = {name: [] for name in [baseline] + [name for name, _ in sides]}  # per side, one result per round
    with tempfile.TemporaryDirectory() as work:
        save_random_teacher(f"{work}/teacher")
        for round_index in range(args.rounds):
            print(f"round {round_index + 1} of {args.rounds}", file=sys.stderr, flush=True)
            runs[baseline].append(_run_side(baseline, args.ranks, _trainer_worker, work, args))
            for name, layout in sides:
                runs[name].append(_run_side(name, args.ranks, _job_worker, work, args, *layout, deepspeed=True))

    print(f"demo teacher -> demo student, {args.ranks} processes (gloo, CPU), micro-batch {args.micro_batch} x "
          f"{args.seq_len}, {args.steps} timed steps after {args.warmup} (rank 0), medians of {args.rounds} "
          f"interleaved rounds")
    width = max(len(name) for name in runs)
    print(f"  {'side':<{width}}  {'s/step':>8}  {'tokens/s':>9}  {'x baseline':>10}  {'range':>11}")
    # Paired: each round's ratio to the baseline of the same round.
    ratios = {name: [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(results, runs[baseline])]
              for name, results in runs.items()}
    for name, results in runs.items():
        print(f"  {name:<{width}}  {median([r['seconds_per_step'] for r in results]):>8.4f}  "
              f"{median([r['tokens_per_s'] for r in results]):>9.0f}  {median(ratios[name]):>10.2f}  "
              f"{min(ratios[name]):>5.2f}-{max(ratios[name]):<5.2f}")
    for name, results in runs.items():
        if "split" in results[0] and median(ratios[name]) < 1.0:
            split = ", ".join(f"{part} {median([r['split'][part] for r in results]):.4f}"
                              for part in results[0]["split"])
            print(f"  where a step of '{name}' goes (s, medians): {split}")


if __name__ == "__main__":
    main()
