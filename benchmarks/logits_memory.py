"""Peak memory of one training step's logits path, in units of L.

    python benchmarks/logits_memory.py [--vocab 32768] [--micro-batch 4] [--seq-len 256] [--fused {off,on,both}]

L = one ``[micro-batch x sequence x V_local]`` logits tensor in the model dtype (all positions
counted). The pair has a large vocabulary and a tiny body (hidden 64, 2 layers), so the logits
dominate what a step allocates; the peak is the live tensor bytes the step's own tensors hold at
once (``model_parallel.testing.memory_counter.LiveBytes``: deterministic, excludes parameters and
optimizer state made before it), and within it the largest single tensor alive at that peak and,
for the fused head, the peak of the fused loss call itself (the rest of a fused step's peak is
ZeRO-3's own gradient buffers, which scale with the parameters, not the tokens), for pre-training batches (every position has a target) and for SFT-like
batches (the first half of every row masked with -100). 1 process, TP 1, fp32, one step after a
warm-up step, ZeRO-3 with 1e6-element communication buckets. ``--fused`` sets ``loss.fused_head``
(``off``: false, ``on``: true, ``both``: each, side by side, each in a fresh process);
not given, the key is left at the config's value.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.demo_pair import FUSED, fused_override, refused_overrides, save_random_teacher  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_counter():
    from model_parallel.testing.memory_counter import LiveBytes

    class Peak(LiveBytes):
        """LiveBytes that also keeps the largest single storage alive at its peak."""

        largest_at_peak = 0

        def _track(self, tensor):
            before = self.peak_bytes
            super()._track(tensor)
            if self.peak_bytes > before:
                self.largest_at_peak = max(self._tracked.values())

    return Peak


def _Peak():
    return _peak_counter()()


@contextlib.contextmanager
def _fused_call_peak():
    """``{"peak": bytes}``: the most the fused loss call itself (``loss.fused``'s chunk loop: both
    heads' chunks, the divergence on them, the gradient accumulators) held at once, where it ran."""
    import loss.fused

    inside, original = {}, loss.fused._forward_chunks

    def counted(*args, **kwargs):
        with _Peak() as call:
            result = original(*args, **kwargs)
        inside["peak"] = max(inside.get("peak", 0), call.peak_bytes)
        return result

    loss.fused._forward_chunks = counted
    try:
        yield inside
    finally:
        loss.fused._forward_chunks = original


def _worker(rank, world_size, work, args, fused):
    """``({batch kind: peak in L}, L in bytes)`` of one ``loss.fused_head`` value (None: unset)."""
    import torch

    from model_parallel.testing.memory_counter import LiveBytes
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.step import train_step

    cfg = load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), [
        f"teacher.path={work}/teacher", f"tokenizer={work}/teacher", f"student.config={work}/student.json",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1", "parallel.tensor_parallel=1",
        f"data.train={work}", f"output_dir={work}/out", f"parallel.deepspeed_config={work}/ds.json"]
        + fused_override(fused))
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                            bf16=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (args.micro_batch, args.seq_len), generator=generator)
    sft = ids.clone()
    sft[:, :args.seq_len // 2] = -100
    logits_bytes = args.micro_batch * args.seq_len * engines.vocab_size * 4  # L, fp32
    peaks = {}
    for name, labels in (("pre-training", ids.clone()), ("SFT, half the positions masked", sft)):
        batch = {"input_ids": ids, "labels": labels}
        train_step(engines, cfg.loss, [batch])  # warm-up
        with _Peak() as counted, _fused_call_peak() as inside:
            train_step(engines, cfg.loss, [batch])
        peaks[name] = {"step": counted.peak_bytes / logits_bytes, "largest": counted.largest_at_peak / logits_bytes,
                       "loss call": inside["peak"] / logits_bytes if "peak" in inside else None}
    return peaks, logits_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--fused", choices=["off", "on", "both"], default=None,
                        help="loss.fused_head false / true / both side by side (default: not set)")
    args = parser.parse_args()
    refused = refused_overrides(override for fused in FUSED[args.fused] for override in fused_override(fused))
    if refused:
        parser.error("this checkout's config refuses " + "; ".join(refused))

    from transformers import LlamaConfig

    from model_parallel.spawn import run_on_ranks

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as work:
        def config(layers):
            return LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                               tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0)

        # ZeRO-3 with small communication buckets: DeepSpeed's default 5e8-element gradient bucket
        # (2 GB in fp32) would be most of the step's allocations and hide the logits path.
        with open(f"{work}/ds.json", "w") as out:
            json.dump({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000000,
                                             "stage3_prefetch_bucket_size": 1000000}}, out)
        save_random_teacher(f"{work}/teacher", config(2), tokens=1024)
        config(2).to_json_file(f"{work}/student.json")
        peaks = {}
        for fused in FUSED[args.fused]:  # a fresh process each: nothing of one side is left for the next
            peaks[fused], logits_bytes = run_on_ranks(1, _worker, work, args, fused, deepspeed=True, timeout=1800)[0]
    print(f"logits path, micro-batch {args.micro_batch} x {args.seq_len}, V {args.vocab} "
          f"(L = {logits_bytes / 1e6:.1f} MB, fp32), 1 process, TP 1")
    columns = {None: "config's", False: "unfused", True: "fused"}
    for part, title in (("step", "the step's peak"), ("largest", "the largest tensor alive at that peak"),
                        ("loss call", "the fused loss call's own peak (chunks, divergence, gradient accumulators)")):
        sides = {fused: side for fused, side in peaks.items() if next(iter(side.values()))[part] is not None}
        if not sides:
            continue
        print(f"  {title}")
        print(f"    {'batches':<32} " + " ".join(f"{columns[fused]:>8}" for fused in sides))
        for name in next(iter(sides.values())):
            print(f"    {name:<32} " + " ".join(f"{side[name][part]:>6.2f} L" for side in sides.values()))

if __name__ == "__main__":
    main()
