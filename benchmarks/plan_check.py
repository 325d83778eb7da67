"""The planner against what the job measures, on CPU: peak memory growth and collective bytes per step.

    python benchmarks/plan_check.py [--layouts 0 1 2 3 4 5 6]

A random Llama teacher (157 M parameters) and student (65 M), fp32, vocabulary 8192, are trained
with the job's own step (``training.step.train_step``: micro-batch 2 x 128, grad_accum 2) on gloo
ranks, one layout at a time. For each: the bytes every rank hands to collectives over one step
after a warm-up step (``model_parallel.comm_counter``, which sees DeepSpeed's own gathers and
reduce-scatters) and the job's ``peak_memory_gb`` reading (``training.memory.PeakMemory``: peak RSS
above the RSS just before the models are built, the maximum over ranks), beside what
``training.plan.estimate`` plans for the same layout. The models are large enough that weights,
optimizer states and activations are most of what the process grows by.

On CPU, glibc keeps freed heap pages once its mmap threshold has grown past the largest tensor
freed, so RSS then overstates what is alive; the ranks run with ``MALLOC_MMAP_THRESHOLD_=65536``
(every tensor-sized allocation mapped and returned on free). What the CPU cannot show: the CUDA
context, the caching allocator's fragmentation and NCCL's buffers (about 1-3 GB per GPU).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (world, tensor_parallel, teacher_placement, student_zero_stage, activation_checkpointing)
LAYOUTS = [(1, 1, "resident", 2, False), (2, 1, "resident", 2, False), (2, 1, "zero3", 3, False),
           (2, 2, "resident", 3, True), (2, 2, "resident", 1, False), (2, 1, "resident", 1, True),
           (2, 1, "resident", 0, False)]
MICRO, SEQ, ACCUM, VOCAB = 2, 128, 2, 8192
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=SEQ, num_attention_heads=8, num_key_value_heads=4,
               tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)
TEACHER = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, **_COMMON)
STUDENT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, **_COMMON)


def _overrides(work, tp, placement, stage, checkpointing):
    return [f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", f"student.config={work}/student.json",
            "train.dtype=fp32", f"train.micro_batch_size={MICRO}", f"train.grad_accum={ACCUM}",
            f"train.activation_checkpointing={str(checkpointing).lower()}", f"parallel.tensor_parallel={tp}",
            f"parallel.teacher_placement={placement}", f"parallel.student_zero_stage={stage}",
            f"data.train={work}", f"data.seq_len={SEQ}", f"output_dir={work}/out"]


def _worker(rank, world_size, work, tp, placement, stage, checkpointing):
    import torch

    from model_parallel.comm_counter import count_collective_bytes
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.memory import PeakMemory
    from training.step import train_step

    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"),
                      _overrides(work, tp, placement, stage, checkpointing))
    memory = PeakMemory(torch.device("cpu"))
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                            bf16=False)
    generator = torch.Generator().manual_seed(engines.dp_rank)  # the same batches on a tensor-parallel group
    for step in range(2):  # a warm-up step, then the counted one
        batches = [torch.randint(4, VOCAB, (MICRO, SEQ), generator=generator) for _ in range(ACCUM)]
        with count_collective_bytes() as counted:
            train_step(engines, cfg.loss, [{"input_ids": ids, "labels": ids.clone()} for ids in batches])
    return {"collective_bytes": counted.total_bytes, "peak_memory_gb": memory.read_gb()}


def planned(work, world, tp, placement, stage, checkpointing):
    """training.plan's estimate of one layout on this machine (``world`` ranks of one node)."""
    from training.config import load_config
    from training.plan import Cluster, Layout, estimate, job_from_config

    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"),
                      _overrides(work, tp, placement, stage, checkpointing))
    job = job_from_config(cfg, world_size=world, bf16=False)
    return estimate(job, Layout(tp, placement, stage, MICRO, ACCUM, checkpointing),
                    Cluster(nodes=1, gpus_per_node=world, gpu_memory_gb=24), device_type="cpu")


def write_pair(work):
    from transformers import LlamaConfig

    from benchmarks.demo_pair import save_random_teacher

    save_random_teacher(f"{work}/teacher", LlamaConfig(**TEACHER), tokens=VOCAB)
    LlamaConfig(**STUDENT).to_json_file(f"{work}/student.json")


def compare(work, layouts):
    """``[(layout, estimate, measured rank 0)]`` for each ``(world, tp, placement, stage, checkpointing)``."""
    from model_parallel.spawn import run_on_ranks

    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by each rank's C library at start-up
    try:
        rows = []
        for world, *layout in layouts:
            measured = run_on_ranks(world, _worker, work, *layout, deepspeed=True, timeout=1800)[0]
            rows.append(((world, *layout), planned(work, world, *layout), measured))
        return rows
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", type=int, nargs="+", default=range(len(LAYOUTS)), help="indices into LAYOUTS")
    args = parser.parse_args()
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as work:
        write_pair(work)
        rows = compare(work, [LAYOUTS[i] for i in args.layouts])
    print(f"teacher 157 M, student 65 M parameters, fp32, micro-batch {MICRO} x {SEQ}, grad_accum {ACCUM}, gloo on CPU")
    print(f"  {'ranks':>5} {'TP':>3} {'teacher':>8} {'ZeRO':>4} {'ckpt':>5}  {'planned GB':>10} {'measured GB':>11} "
          f"{'ratio':>6}  {'planned MB':>10} {'counted MB':>10} {'ratio':>6}")
    for (world, tp, placement, stage, checkpointing), plan, measured in rows:
        planned_gb, planned_mb = plan.peak_memory_bytes / 1e9, sum(plan.traffic.values()) / 1e6
        counted_mb = measured["collective_bytes"] / 1e6
        print(f"  {world:>5} {tp:>3} {placement:>8} {stage:>4} {str(checkpointing).lower():>5}  {planned_gb:>10.3f} "
              f"{measured['peak_memory_gb']:>11.3f} {planned_gb / measured['peak_memory_gb']:>6.2f}  {planned_mb:>10.1f} "
              f"{counted_mb:>10.1f} {planned_mb / counted_mb:>6.3f}")


if __name__ == "__main__":
    main()
