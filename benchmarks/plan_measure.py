"""What one training step really does per layout, on CPU: collective bytes, peak RSS, shard sizes.

    python benchmarks/plan_measure.py [--out /tmp/plan_measure.json] [--buckets default small]

A random Llama teacher (~26M parameters) and student (~13M), fp32, vocabulary 8192, are trained
with ``training.step.train_step`` (micro-batch 4 x 256 tokens, grad_accum 2) on gloo ranks for each
layout (world, TP, teacher placement, student ZeRO stage, activation checkpointing). After 2
warm-up steps, 3 steps are measured per rank:

- bytes handed into each collective, per step (``model_parallel.comm_counter``, plus what it does
  not patch: ``reduce``, list ``reduce_scatter``, ``all_reduce_coalesced``, and DeepSpeed's shm
  ``inference_all_reduce`` that a frozen AutoTP teacher's row-parallel layers use on CPU);
- peak RSS growth above the RSS just before the models are built (``training.memory.PeakMemory``),
  also the RSS growth right after building and the peak reached while building;
- the parameters each rank holds (``numel``; ZeRO-3's ``ds_numel`` / local ``ds_tensor``), the
  student optimizer's type and its inner optimizer's master-parameter and state elements.

``--buckets small`` runs with reduce/allgather/prefetch buckets of 5e6 elements instead of
DeepSpeed's defaults (a copy of ds_configs/zero3_tp.json). One JSON line per layout is printed;
all of them go to ``--out``.
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (world, tensor_parallel, teacher_placement, student_zero_stage, activation_checkpointing)
LAYOUTS = [(1, 1, "resident", 2, False), (2, 1, "resident", 2, False), (2, 1, "zero3", 3, False),
           (2, 2, "resident", 3, True), (2, 2, "resident", 1, False), (2, 1, "resident", 1, True)]
MICRO, SEQ, ACCUM, WARMUP, STEPS, VOCAB = 4, 256, 2, 2, 3, 8192


@contextlib.contextmanager
def _uncounted_collectives(counted):
    """Count, into ``counted``, the collectives ``count_collective_bytes`` does not patch."""
    import torch
    import torch.distributed as dist
    from deepspeed.comm import comm

    def add(name, tensors):
        counted.calls[name] = counted.calls.get(name, 0) + 1
        counted.bytes[name] = counted.bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors)

    def wrap(name, original, inputs):
        return lambda *a, **k: (add(name, inputs(a, k)), original(*a, **k))[1]

    patches = [(dist, "reduce", wrap("reduce", dist.reduce, lambda a, k: [a[0] if a else k["tensor"]])),
               (dist, "reduce_scatter", wrap("reduce_scatter", dist.reduce_scatter,
                                             lambda a, k: a[1] if len(a) > 1 else k["input_list"])),
               (dist, "all_reduce_coalesced", wrap("all_reduce_coalesced", dist.all_reduce_coalesced,
                                                   lambda a, k: a[0] if a else k["tensors"]))]
    backend, original = comm.cdb, comm.cdb.inference_all_reduce

    def inference_all_reduce(tensor, op, group=None):  # counted here only where it takes the shm path
        level = 1 if tensor.dtype == torch.float32 else 2
        if (hasattr(torch.ops.deepspeed, "inference_all_reduce_") and dist.get_world_size(group) > 1
                and getattr(backend, "shm_vector_kernel_level", 0) >= level):
            add("inference_all_reduce (shm)", [tensor])
        return original(tensor, op, group)

    patches.append((backend, "inference_all_reduce", inference_all_reduce))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, function in patches:
        setattr(owner, name, function)
    try:
        yield counted
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)


def _held(module):
    params = list(module.parameters())
    return {"numel": sum(p.numel() for p in params),
            "ds_numel": sum(getattr(p, "ds_numel", 0) for p in params),
            "ds_tensor_numel": sum(p.ds_tensor.numel() for p in params if getattr(p, "ds_tensor", None) is not None)}


def _worker(rank, world_size, work, ds_config, tp, placement, stage, ckpt):
    import psutil
    import torch

    from model_parallel.comm_counter import count_collective_bytes
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.memory import PeakMemory
    from training.step import train_step

    overrides = [f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", f"student.config={work}/student.json",
                 "train.dtype=fp32", f"train.micro_batch_size={MICRO}", f"train.grad_accum={ACCUM}",
                 f"train.activation_checkpointing={str(ckpt).lower()}", f"parallel.tensor_parallel={tp}",
                 f"parallel.teacher_placement={placement}", f"parallel.student_zero_stage={stage}",
                 f"parallel.deepspeed_config={ds_config}", f"data.train={work}", f"output_dir={work}/out"]
    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), overrides)
    ds_configs = build_deepspeed_configs(cfg, world_size, False)
    process = psutil.Process()
    memory = PeakMemory(torch.device("cpu"))
    engines = build_engines(**engine_sources(cfg), ds_configs=ds_configs, bf16=False)
    gb = 1e9
    out = {"rss_after_build_gb": (process.memory_info().rss - memory.baseline) / gb,
           "peak_while_building_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - memory.baseline) / gb}
    generator = torch.Generator().manual_seed(engines.dp_rank)  # the same batches on a tensor-parallel group
    with contextlib.ExitStack() as stack:
        for step in range(WARMUP + STEPS):
            if step == WARMUP:
                counted = stack.enter_context(_uncounted_collectives(stack.enter_context(count_collective_bytes())))
                started = time.perf_counter()
            batches = [torch.randint(4, VOCAB, (MICRO, SEQ), generator=generator) for _ in range(ACCUM)]
            train_step(engines, cfg.loss, [{"input_ids": ids, "labels": ids.clone()} for ids in batches])
        seconds = time.perf_counter() - started
    inner = getattr(engines.student.optimizer, "optimizer", engines.student.optimizer)
    out.update({
        "peak_rss_growth_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - memory.baseline) / gb,
        "peak_memory_gb_read": memory.read_gb(),  # PeakMemory's own reading: already the max over ranks "rss_after_steps_gb": (process.memory_info().rss - memory.baseline) / gb,
        "seconds_per_step": seconds / STEPS, "dp_size": engines.dp_size,
        "bytes_per_step": {name: value / STEPS for name, value in sorted(counted.bytes.items())},
        "calls_per_step": {name: value / STEPS for name, value in sorted(counted.calls.items())},
        "student": _held(engines.student.module), "teacher": _held(engines.teacher.module),
        "optimizer": type(engines.student.optimizer).__name__, "inner_optimizer": type(inner).__name__,
        "optimizer_master_numel": sum(p.numel() for g in inner.param_groups for p in g["params"]),
        "optimizer_state_numel": sum(t.numel() for s in inner.state.values() for t in s.values()
                                     if torch.is_tensor(t) and t.dim() > 0)})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/plan_measure.json")
    parser.add_argument("--buckets", nargs="+", choices=("default", "small"), default=["default"])
    parser.add_argument("--layouts", type=int, nargs="+", default=range(len(LAYOUTS)), help="indices into LAYOUTS")
    args = parser.parse_args()

    from transformers import LlamaConfig

    from benchmarks.demo_pair import save_random_teacher
    from model_parallel.spawn import run_on_ranks

    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    common = dict(vocab_size=VOCAB, max_position_embeddings=SEQ, num_attention_heads=8, num_key_value_heads=4,
                  tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    results = []
    with tempfile.TemporaryDirectory() as work:
        save_random_teacher(f"{work}/teacher", LlamaConfig(hidden_size=512, intermediate_size=1408,
                                                           num_hidden_layers=6, **common), tokens=VOCAB)
        LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, **common).to_json_file(
            f"{work}/student.json")
        ds = json.load(open(os.path.join(ROOT, "ds_configs/zero3_tp.json")))
        ds["zero_optimization"].update(reduce_bucket_size=int(5e6), allgather_bucket_size=int(5e6),
                                       stage3_prefetch_bucket_size=int(5e6))
        json.dump(ds, open(f"{work}/small_buckets.json", "w"))
        configs = {"default": "ds_configs/zero3_tp.json", "small": f"{work}/small_buckets.json"}
        for buckets in args.buckets:
            for world, tp, placement, stage, ckpt in (LAYOUTS[i] for i in args.layouts):
                started = time.perf_counter()
                ranks = run_on_ranks(world, _worker, work, configs[buckets], tp, placement, stage, ckpt,
                                     deepspeed=True, timeout=1800)
                row = {"world": world, "tp": tp, "dp": world // tp, "teacher_placement": placement,
                       "student_zero_stage": stage, "activation_checkpointing": ckpt, "buckets": buckets,
                       **ranks[0], "peak_rss_growth_gb_max_over_ranks": max(r["peak_rss_growth_gb"] for r in ranks),
                       "wall_s": time.perf_counter() - started}
                print(json.dumps(row), flush=True)
                results.append(row)
                json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
