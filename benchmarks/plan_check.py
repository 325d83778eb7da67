"""The planner against what the job measures, on CPU: peak memory growth and collective bytes per step.

    python benchmarks/plan_check.py [--rows 0 1 2 ...]

Random pairs, fp32, vocabulary 8192, micro-batch 2 x 128, grad_accum 2: a Llama teacher (146 M
parameters) and student (65 M), a Gemma-2 teacher (134 M; 143 M untied at TP > 1) and student (59 M;
soft-capped eager attention, fp32-saving norms, tied), and a smaller Llama pair (53 M / 19 M). Each
row runs the job itself (``training.job.run``, as ``launch/distill.py`` does) on gloo ranks for 2
steps and reads what it logs at step 2: ``peak_memory_gb`` (``training.memory.PeakMemory``: peak RSS above the RSS just
before the models are built, the maximum over ranks; the job fixes glibc's mmap threshold itself)
beside its own ``planned_peak_memory_gb`` (``training.plan``), and the bytes every rank hands to
collectives in step 2 (``model_parallel.testing.comm_counter``, which sees DeepSpeed's own gathers
and reduce-scatters) beside the plan's traffic. The models are large enough that weights, optimizer
states and activations are most of what the process grows by. What the CPU cannot show: the CUDA
context, the caching allocator's fragmentation and NCCL's buffers (the plan's reserve on CUDA).
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
               bos_token_id=2, eos_token_id=3, pad_token_id=0)
PAIRS = {
    "llama": ("LlamaConfig", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=11,
                                  tie_word_embeddings=False, **_COMMON),
              dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, tie_word_embeddings=False, **_COMMON)),
    # Gemma-2 as the paper's pair has it: tied, soft-capped, GQA, sliding-window layers (window 64 < 128).
    "gemma2": ("Gemma2Config", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, head_dim=128,
                                    query_pre_attn_scalar=128, sliding_window=64, **_COMMON),
               dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, head_dim=96,
                    query_pre_attn_scalar=96, sliding_window=64, **_COMMON)),
    # Smaller, where the libraries the build loads weigh more: a 53 M / 19 M Llama pair.
    "llama_small": ("LlamaConfig", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=14,
                                        tie_word_embeddings=False, **_COMMON),
                    dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, tie_word_embeddings=False,
                         **_COMMON)),
}
# (pair, *layout): every layout with the Llama pair, the Gemma-2 pair at TP 1 and 2, the small pair at TP 2.
ROWS = [("llama", *layout) for layout in LAYOUTS] + [("gemma2", *LAYOUTS[2]), ("gemma2", *LAYOUTS[4]),
                                                     ("llama_small", *LAYOUTS[4])]


def _overrides(work, pair, tp, placement, stage, checkpointing):
    where = os.path.join(work, pair)
    return [f"teacher.path={where}/teacher", f"tokenizer={where}/teacher", f"student.config={where}/student.json",
            "train.dtype=fp32", f"train.micro_batch_size={MICRO}", f"train.grad_accum={ACCUM}",
            "train.max_steps=100", "train.stop_at_step=2", "train.warmup_steps=1", "logging.every=1",
            f"train.activation_checkpointing={str(checkpointing).lower()}", f"parallel.tensor_parallel={tp}",
            f"parallel.teacher_placement={placement}", f"parallel.student_zero_stage={stage}",
            f"data.train={where}/data", "data.eval=null", f"data.seq_len={SEQ}",
            f"output_dir={where}/out-{tp}-{placement}-{stage}-{checkpointing}"]


def _worker(rank, world_size, work, pair, tp, placement, stage, checkpointing):
    """The job's own run; the collective bytes of its second step are counted around its step."""
    from model_parallel.testing.comm_counter import count_collective_bytes
    from training import job
    from training.config import load_config

    counted = []
    step = job.train_step

    def counting_step(*args, **kwargs):
        with count_collective_bytes() as bytes_:
            result = step(*args, **kwargs)
        counted.append(bytes_.total_bytes)
        return result

    job.train_step = counting_step
    job.checkpoint.save = lambda *args, **kwargs: None  # the step is measured, not the checkpoint
    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"),
                      _overrides(work, pair, tp, placement, stage, checkpointing))
    scalars = job.run(cfg)
    return {"collective_bytes": counted[-1], "peak_memory_gb": scalars["train/peak_memory_gb"],
            "planned_peak_memory_gb": scalars["train/planned_peak_memory_gb"]}


def planned(work, pair, world, tp, placement, stage, checkpointing):
    """training.plan's estimate of one layout on this machine (``world`` ranks of one node)."""
    from training.config import load_config
    from training.plan import Cluster, Layout, estimate, job_from_config

    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"),
                      _overrides(work, pair, tp, placement, stage, checkpointing))
    job = job_from_config(cfg, world_size=world, bf16=False)
    return estimate(job, Layout(tp, placement, stage, MICRO, ACCUM, checkpointing),
                    Cluster(nodes=1, gpus_per_node=world, gpu_memory_gb=24), device_type="cpu")


def write_pair(work, pair="llama"):
    """``work/pair``: the random teacher with a word-level tokenizer, the student's config, and
    prepared training data (random words, 64 sequences of SEQ tokens)."""
    import random

    import transformers

    from benchmarks.demo_pair import save_random_teacher
    from data.prepare import prepare

    where = os.path.join(work, pair)
    if os.path.isdir(os.path.join(where, "data")):
        return
    os.makedirs(where, exist_ok=True)
    config_class, teacher, student = PAIRS[pair]
    config_class = getattr(transformers, config_class)
    save_random_teacher(f"{where}/teacher", config_class(**teacher), tokens=VOCAB)
    config_class(**student).to_json_file(f"{where}/student.json")
    words = random.Random(0)
    with open(f"{where}/corpus.txt", "w") as out:
        for _ in range(64):
            out.write(" ".join(f"t{words.randrange(4, VOCAB)}" for _ in range(SEQ + 8)) + "\n")
    prepare(f"{where}/teacher", [f"{where}/corpus.txt"], f"{where}/data", fmt="text", seq_len=SEQ)


def compare(work, rows):
    """``[(row, estimate, measured rank 0)]`` for each ``(pair, world, tp, placement, stage, checkpointing)``."""
    from model_parallel.spawn import run_on_ranks

    results = []
    for pair, world, *layout in rows:
        write_pair(work, pair)
        measured = run_on_ranks(world, _worker, work, pair, *layout, deepspeed=True, timeout=1800)[0]
        results.append(((pair, world, *layout), planned(work, pair, world, *layout), measured))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=range(len(ROWS)), help="indices into ROWS")
    args = parser.parse_args()
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as work:
        rows = compare(work, [ROWS[i] for i in args.rows])
    print(f"fp32, micro-batch {MICRO} x {SEQ}, grad_accum {ACCUM}, gloo on CPU; the job's own logged figures at step 2")
    print(f"  {'pair':>11} {'ranks':>5} {'TP':>3} {'teacher':>8} {'ZeRO':>4} {'ckpt':>5}  {'planned GB':>10} "
          f"{'measured GB':>11} {'ratio':>6}  {'planned MB':>10} {'counted MB':>10} {'ratio':>6}")
    for (pair, world, tp, placement, stage, checkpointing), plan, measured in rows:
        planned_gb, planned_mb = measured["planned_peak_memory_gb"], sum(plan.traffic.values()) / 1e6
        counted_mb = measured["collective_bytes"] / 1e6
        print(f"  {pair:>11} {world:>5} {tp:>3} {placement:>8} {stage:>4} {str(checkpointing).lower():>5}  "
              f"{planned_gb:>10.3f} {measured['peak_memory_gb']:>11.3f} {planned_gb / measured['peak_memory_gb']:>6.2f}  "
              f"{planned_mb:>10.1f} {counted_mb:>10.1f} {planned_mb / counted_mb:>6.3f}")


if __name__ == "__main__":
    main()
