"""The cost of on-policy distillation: the job's generation against transformers' ``generate``, and
the on-policy step against the off-policy step, on one process.

    python benchmarks/generation.py [--pair {demo,small,wide}] [--rows B] [--prompt-tokens P]
                                    [--new-tokens N] [--rounds R] [--steps S] [--warmup 1]
                                    [--grad-accum G] [--seq-len L] [--temperature T]
                                    [--stage {0,1,2,3,auto}]

The pair (``benchmarks.demo_pair.PAIRS``: random weights, fp32) is built as the job builds it, on
one rank (``training.engines.build_engines``: TP 1, the pair's teacher resident, the student's
ZeRO stage ``--stage``, ``auto`` resolved as the job resolves it and printed). Prompts are text
blocks: each row a block of random ids of the pair's vocabulary (as ``benchmarks/distill.py``
feeds), its first P tokens the prompt (``training.on_policy.prompts``).

1. **Generation.** :func:`training.generation.generate` on the student engine (temperature 1 and
   0: Gumbel-max sampling on the logit slice, and the argmax) against transformers'
   ``model.generate`` on the same module (``do_sample`` True / False, top-k and top-p off), on the
   same B prompts, both writing exactly N tokens (``min_new_tokens = max_new_tokens = N``,
   ``eos_token_id=None``: neither stops early). Under ZeRO-3 both run with the student gathered
   whole once per call (the job's own gather; DeepSpeed's ``unwrap_model_for_generation`` around
   transformers'). Tokens/s = B·N / seconds of one call. The four sides run once per round, the
   rounds one after another, after ``--warmup`` untimed rounds; medians and ranges over rounds are
   printed, and each job side's ratio to transformers' is taken within a round (paired). Also: the
   sampler's share of the job's generation time (``model_parallel.sample_tokens`` timed by
   wrapping it; CPU only, where a call's time is its own without a device sync), and greedy
   agreement: the job's tokens at temperature 0 against transformers' greedy ones on the full
   vocabulary (100% expected; transformers samples with its own RNG, so sampled tokens differ).
2. **The step.** S off-policy steps (:func:`training.step.train_step` on the data micro-batches:
   G micro-batches of B blocks of L tokens) and S on-policy steps
   (:func:`training.on_policy.generate_micro_batches`, then ``train_step`` on the B scored rows of
   P + N tokens per micro-batch, loss on the N continuation tokens), alternating, on the same
   engines (they train: each step changes the weights, as in the job). Seconds per step of each,
   the on-policy step's generation and ``train_step`` parts, and on-policy / off-policy (paired
   per step). A run with λ = ``on_policy.fraction`` costs about (1 − λ)·off + λ·on per step.

What it does not show: a GPU. On CPU the decode loop is compute-bound and a forward of one token
per row costs little next to a training forward of L; on a GPU decode is memory-bound (each new
token re-reads the weights and the KV cache) and launch-bound at small B, so the ratio of the
on-policy step to the off-policy step differs (``launch.plan``'s ``generation_s`` estimates it for
a layout). Nor multi-rank layouts (AutoTP, ZeRO-3 over several ranks: ``tests/test_on_policy_job.py``
checks them, it does not time them), nor bf16, nor transformers' static cache or compiled decode.
The machine this runs on here is a shared 2-core CPU whose speed drifts between minutes: compare
sides within a run (the paired ratios), not figures across runs.
"""

import argparse
import os
import sys
import tempfile
import time
from statistics import median
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.demo_pair import PAIRS, write_pair  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The generation sides: (name, the job's or transformers', temperature); each round runs them in this order.
GENERATION_SIDES = (("job generate, temperature 1", "job", 1.0), ("HF generate, do_sample=True", "hf", 1.0),
                    ("job generate, temperature 0", "job", 0.0), ("HF generate, do_sample=False", "hf", 0.0))
STEP_SIDES = ("off-policy", "on-policy")


def _job_config(work: str, args):
    """The demo config on the pair at TP 1, with the on-policy section at the benchmark's sizes."""
    from training.config import load_config

    overrides = [f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", f"student.config={work}/student.json",
                 "loss.kind=tail", f"train.micro_batch_size={args.rows}", f"train.grad_accum={args.grad_accum}",
                 f"data.train={work}", f"output_dir={work}/out", "parallel.tensor_parallel=1",
                 "parallel.teacher_placement=resident", f"parallel.student_zero_stage={args.stage}",
                 "on_policy.fraction=1.0", f"on_policy.prompt_tokens={args.prompt_tokens}",
                 f"on_policy.max_new_tokens={args.new_tokens}", f"on_policy.temperature={args.temperature}"]
    return load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), overrides)


def _host_batches(args, generator) -> List[dict]:
    """One step's ``grad_accum`` data micro-batches, as :class:`data.loader.Collator` gives text blocks:
    ``[B, L]`` random ids past the 4 special ids, every position labelled."""
    import torch

    batches = []
    for _ in range(args.grad_accum):
        ids = torch.randint(4, PAIRS[args.pair].vocab, (args.rows, args.seq_len), generator=generator,
                            device="cpu")  # (B, L)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def _synchronize(device) -> None:
    if device.type != "cpu":
        import torch

        torch.accelerator.synchronize(device)  # host sync: a timed call ends when the device's work does


class _SamplerClock:
    """Times :func:`model_parallel.sample_tokens` as :mod:`training.generation` calls it (seconds,
    summed while ``running``). On CPU only: on an accelerator a call's own time needs a device sync
    around it, which would slow what is measured."""

    def __init__(self, device):
        import training.generation as generation

        self.module, self.original = generation, generation.sample_tokens
        self.enabled, self.running, self.seconds = device.type == "cpu", False, 0.0
        if self.enabled:
            generation.sample_tokens = self._timed

    def _timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            if self.running:
                self.seconds += time.perf_counter() - started

    def close(self) -> None:
        self.module.sample_tokens = self.original


def _job_generate(engines, prompt_ids, args, temperature: float, clock: _SamplerClock):
    """``(tokens [B, N], seconds, sampler seconds)`` of one call of the job's generation."""
    import torch

    from training.generation import Sampling, generate

    sequence = torch.arange(args.rows, dtype=torch.long, device=engines.device)  # (B,) the noise's row ids
    clock.running, clock.seconds = True, 0.0
    _synchronize(engines.device)
    started = time.perf_counter()
    tokens = generate(engines.student, prompt_ids, None, max_new_tokens=args.new_tokens,
                      sampling=Sampling(temperature=temperature, seed=0, step=0), sequence=sequence,
                      vocab_start=engines.vocab_start, real_vocab_size=engines.real_vocab_size,
                      tp_group=engines.tp_group)  # (B, N)
    _synchronize(engines.device)
    seconds = time.perf_counter() - started
    clock.running = False
    return tokens, seconds, clock.seconds


def _whole(engine):
    """The student gathered whole for transformers' call under ZeRO-3, as the job's generation gathers it."""
    import contextlib

    if engine.zero_optimization_stage() == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(engine)
    return contextlib.nullcontext()


def _hf_generate(engines, prompt_ids, args, temperature: float):
    """``(tokens [B, N], seconds)`` of one call of transformers' ``generate`` on the student's module,
    exactly N new tokens, sampling from the plain softmax (no top-k, no top-p) or greedy."""
    import torch

    model, tokenizer = engines.student.module, engines.tokenizer
    was_training = model.training
    model.eval()
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
        "do_sample": False}
    try:
        _synchronize(engines.device)
        started = time.perf_counter()
        with _whole(engines.student), torch.no_grad():
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids, device=prompt_ids.device),
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)  # (B, P + N)
        _synchronize(engines.device)
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    return out[:, prompt_ids.shape[1]:], seconds


def _generation_rounds(engines, cfg, args) -> dict:
    """Per side, one ``{"seconds", "sampler_seconds"}`` per timed round; and the greedy agreement
    (equal tokens over all timed rounds, and their count)."""
    import torch

    from training.on_policy import prompts

    generator = torch.Generator(device="cpu").manual_seed(1)
    prompt = prompts(_host_batches(args, generator)[0], cfg.on_policy, sft=False, seq_len=args.seq_len,
                     pad_token_id=engines.tokenizer.pad_token_id)
    prompt_ids = prompt.ids.to(engines.device)  # (B, P): text blocks' prompts are never padded
    clock = _SamplerClock(engines.device)
    rounds = {name: [] for name, _, _ in GENERATION_SIDES}
    equal = compared = 0
    try:
        for round_index in range(args.warmup + args.rounds):
            tokens = {}
            for name, side, temperature in GENERATION_SIDES:
                if side == "job":
                    tokens[name], seconds, sampler = _job_generate(engines, prompt_ids, args, temperature, clock)
                else:
                    (tokens[name], seconds), sampler = _hf_generate(engines, prompt_ids, args, temperature), None
                if round_index >= args.warmup:
                    rounds[name].append({"seconds": seconds, "sampler_seconds": sampler})
            if round_index >= args.warmup:
                same = tokens["job generate, temperature 0"] == tokens["HF generate, do_sample=False"]
                equal += int(same.sum())  # host sync: the agreement figure, once per round
                compared += same.numel()
    finally:
        clock.close()
    return {"rounds": rounds, "greedy_equal": equal, "greedy_compared": compared, "sampler_timed": clock.enabled}


def _step_rounds(engines, cfg, args) -> dict:
    """Per step side, one ``{"seconds", "generation_seconds"}`` per timed step, the two sides alternating."""
    import torch

    from training.on_policy import generate_micro_batches
    from training.step import train_step

    generator = torch.Generator(device="cpu").manual_seed(2)
    rounds = {name: [] for name in STEP_SIDES}
    for step in range(args.warmup + args.steps):
        batches = _host_batches(args, generator)
        for name in STEP_SIDES:
            _synchronize(engines.device)
            started, generation_seconds = time.perf_counter(), None
            if name == "off-policy":
                train_step(engines, cfg.loss, batches)  # ends with DeepSpeed's host-side step decision
            else:
                sample_ids = [range(i * args.rows, (i + 1) * args.rows) for i in range(args.grad_accum)]
                generation = generate_micro_batches(engines, cfg, batches, sample_ids, step, sft=False,
                                                    seq_len=args.seq_len, timed=True)
                generation_seconds = generation.seconds
                train_step(engines, cfg.loss, generation.micro_batches)
            _synchronize(engines.device)
            if step >= args.warmup:
                rounds[name].append({"seconds": time.perf_counter() - started,
                                     "generation_seconds": generation_seconds})
    return rounds


def _worker(rank, world_size, work, args):
    import torch

    from model_parallel.distributed import accelerator_device
    from training.auto_stage import resolve_auto_stage
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources

    cfg = _job_config(work, args)
    cfg, _ = resolve_auto_stage(cfg, world_size=world_size, bf16=False, device=accelerator_device())
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                            bf16=False)
    try:  # generation first: on the untrained student, the same weights for every side
        results = {"generation": _generation_rounds(engines, cfg, args), "steps": _step_rounds(engines, cfg, args),
                   "stage": cfg.parallel.student_zero_stage, "fused": engines.fused is not None,
                   "device": str(engines.device),
                   "threads": torch.get_num_threads(),
                   "loss": {"kind": cfg.loss.kind, "top_k": cfg.loss.top_k, "beta": cfg.loss.beta}}
    finally:
        engines.student.destroy()
        if engines.teacher is not None:
            engines.teacher.destroy()
    return results


def _range(values, digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _report_generation(args, generation: dict) -> None:
    rounds, tokens = generation["rounds"], args.rows * args.new_tokens
    print(f"generation: B {args.rows} rows, prompt P {args.prompt_tokens} tokens, N {args.new_tokens} new tokens "
          f"(no early stop), tokens/s = B*N / seconds of one call; medians of {args.rounds} interleaved rounds "
          f"after {args.warmup} warm-up, (min-max)")
    width = max(len(name) for name in rounds)
    print(f"  {'side':<{width}}  {'s/call':>8}  {'tokens/s':>9}  {'range tokens/s':>15}  {'x HF':>6}  {'range':>9}")
    for name, side, temperature in GENERATION_SIDES:
        rates = [tokens / r["seconds"] for r in rounds[name]]
        reference = "HF generate, do_sample=True" if temperature > 0 else "HF generate, do_sample=False"
        ratios = [rate / (tokens / r["seconds"]) for rate, r in zip(rates, rounds[reference])]  # paired by round
        print(f"  {name:<{width}}  {median(r['seconds'] for r in rounds[name]):>8.4f}  {median(rates):>9.1f}  "
              f"{_range(rates, 0):>15}  {median(ratios):>6.2f}  {_range(ratios):>9}")
    if generation["sampler_timed"]:
        shares = {temperature: median(100 * r["sampler_seconds"] / r["seconds"] for r in rounds[name])
                  for name, side, temperature in GENERATION_SIDES if side == "job"}
        print(f"  sampler (model_parallel.sample_tokens): {shares[1.0]:.1f}% of the job's generation at temperature 1, "
              f"{shares[0.0]:.1f}% at temperature 0 (medians)")
    else:
        print("  sampler (model_parallel.sample_tokens): not timed on an accelerator")
    equal, compared = generation["greedy_equal"], generation["greedy_compared"]
    print(f"  greedy agreement (job temperature 0 vs HF do_sample=False): {100 * equal / compared:.2f}% of "
          f"{compared} tokens")


def _report_steps(args, steps: dict, loss: dict) -> None:
    print(f"step: off-policy on the data (B {args.rows} blocks of L {args.seq_len} tokens per micro-batch) vs "
          f"on-policy (generation at temperature {args.temperature:g}, then the step on B {args.rows} rows of "
          f"P + N = {args.prompt_tokens} + {args.new_tokens} tokens, loss on the N), grad_accum {args.grad_accum}, "
          f"loss {loss['kind']} K {loss['top_k']} beta {loss['beta']:g}; medians of {args.steps} steps each, "
          f"alternating, after {args.warmup} warm-up, (min-max)")
    off, on = steps["off-policy"], steps["on-policy"]
    rows = [("off-policy step", [r["seconds"] for r in off]), ("on-policy step", [r["seconds"] for r in on]),
            ("  generation", [r["generation_seconds"] for r in on]),
            ("  train_step", [r["seconds"] - r["generation_seconds"] for r in on])]
    width = max(len(name) for name, _ in rows)
    print(f"  {'side':<{width}}  {'s/step':>8}  {'range':>13}")
    for name, values in rows:
        print(f"  {name:<{width}}  {median(values):>8.4f}  {_range(values, 4):>13}")
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(off, on)]  # paired by step
    share = [100 * r["generation_seconds"] / r["seconds"] for r in on]
    print(f"  on-policy / off-policy: {median(ratios):.2f} (range {_range(ratios)}); generation "
          f"{median(share):.1f}% of the on-policy step")


def _report(args, results: dict) -> None:
    pair = PAIRS[args.pair]
    fused = "on" if results["fused"] else "off"
    print("figures from a shared, busy 2-core CPU (other jobs running at the same time): compare the sides of "
          "one run (the paired ratios), not figures across runs")
    print(f"{args.pair} pair: student {pair.student[0]} x {pair.student[1]} layers, teacher {pair.teacher[0]} x "
          f"{pair.teacher[1]}, V {pair.vocab:,} ({pair.tokenizer} tokenizer); random weights, fp32, one process "
          f"on {results['device']} ({results['threads']} thread{'s' * (results['threads'] > 1)}), TP 1, teacher resident, student ZeRO-{results['stage']} "
          f"(--stage {args.stage}), fused head {fused}")
    _report_generation(args, results["generation"])
    _report_steps(args, results["steps"], results["loss"])


def _stage(value: str):
    return value if value == "auto" else int(value)


def _arguments(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="demo", help="benchmarks.demo_pair.PAIRS")
    parser.add_argument("--rows", type=int, default=8, help="B: rows per micro-batch (and per generation call)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="P: on_policy.prompt_tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="N: on_policy.max_new_tokens")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the four generation sides")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds, and untimed steps of each kind")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=None, help="L: the data blocks' length (default: the pair's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="on_policy.temperature of the on-policy steps")
    parser.add_argument("--stage", type=_stage, default="auto", choices=[0, 1, 2, 3, "auto"],
                        help="parallel.student_zero_stage")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or PAIRS[args.pair].seq_len
    for name in ("rows", "prompt_tokens", "new_tokens", "rounds", "steps", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.prompt_tokens + args.new_tokens > args.seq_len:
        parser.error(f"--prompt-tokens + --new-tokens: must be <= the blocks' length {args.seq_len} (as the job's "
                     f"on_policy check), got {args.prompt_tokens} + {args.new_tokens}")
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    """Run and print the benchmark; returns rank 0's raw results (seconds per side and round)."""
    from model_parallel.spawn import run_on_ranks

    args = _arguments(argv)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the demo config's paths are relative to the repository (the rank inherits it)
    try:
        with tempfile.TemporaryDirectory() as work:
            write_pair(args.pair, work)
            results = run_on_ranks(1, _worker, work, args, deepspeed=True, timeout=1800)[0]
    finally:
        os.chdir(cwd)  # main may run inside another process (the test)
    _report(args, results)
    return results


if __name__ == "__main__":
    main()
