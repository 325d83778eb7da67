"""parallel.teacher_placement: a resident teacher keeps its tensor-parallel shard and gathers nothing.

On 2 gloo ranks at TP 2, the same teacher is built resident (ZeRO stage 0 + AutoTP) and ZeRO-3
partitioned with ``stage3_param_persistence_threshold: 0`` (the positive control: every
parameter is gathered on every forward, so the counter is known to see DeepSpeed's collectives).
"""

import json
import os

import pytest
import torch

from model_parallel.spawn import run_on_ranks
from tests.tiny_models import llama, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _rank(rank, world_size, teacher_dir, ds_path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from model_parallel.testing.comm_counter import count_collective_bytes
    from training.config import TeacherConfig
    from training.deepspeed_config import frozen_deepspeed_configs
    from training.engines import build_teacher

    configs = frozen_deepspeed_configs(ds_path, tensor_parallel=2, world_size=world_size, micro_batch_size=2,
                                       bf16=False)
    ids = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        reference = plain(input_ids=ids).logits  # (2, 16, V), one device
    out = {"full_numel": sum(p.numel() for p in plain.parameters()),
           "shard_numel": sum(p.numel() // world_size if any(name in n for name in SHARDED) else p.numel()
                              for n, p in plain.named_parameters())}
    for placement, ds in (("resident", configs), ("zero3", configs._replace(teacher=configs.frozen))):
        teacher = build_teacher(TeacherConfig(path=teacher_dir), vocab_size=VOCAB, ds_configs=ds, dtype=torch.float32,
                                tensor_parallel=2, seed=0)
        start = teacher.module.get_output_embeddings().vocab_start_index
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)  # the first forward: DeepSpeed's one-time input check
            with count_collective_bytes() as counted:
                for _ in range(3):
                    logits = teacher(input_ids=ids, use_cache=False).logits  # (2, 16, V/2)
        out[placement] = {
            "gathered_bytes": sum(v for k, v in counted.bytes.items() if k.startswith("all_gather")),
            "numel": sum(p.numel() for p in teacher.module.parameters()),
            "error_vs_one_device": float((logits - reference[..., start:start + logits.shape[-1]]).abs().max()),
            "logits": logits,
        }
        dist.barrier()
    out["resident_vs_zero3"] = float((out["resident"].pop("logits") - out["zero3"].pop("logits")).abs().max())
    return out


@pytest.fixture(scope="module")
def placements(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("placement")
    ds = json.load(open(os.path.join(ROOT, "ds_configs/zero3_tp.json")))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # gather every parameter
    ds_path = root / "ds.json"
    ds_path.write_text(json.dumps(ds))
    teacher = save_model(llama(VOCAB, hidden=48), root / "teacher", tokenizer)
    return run_on_ranks(2, _rank, teacher, str(ds_path), deepspeed=True, timeout=300)


def test_a_resident_teacher_forward_gathers_no_parameters(placements):
    for out in placements:
        assert out["zero3"]["gathered_bytes"] > 0  # the counter sees ZeRO-3's gathers...
        assert out["resident"]["gathered_bytes"] == 0  # ...and the resident teacher makes none


def test_a_resident_teacher_holds_only_its_shard(placements):
    for out in placements:
        assert out["resident"]["numel"] == out["shard_numel"] < out["full_numel"]


def test_placements_give_the_same_logits_as_one_device(placements):
    for out in placements:
        # fp32; row-parallel layers all-reduce partial sums in another order than one matmul.
        assert out["resident_vs_zero3"] < 1e-6
        assert out["resident"]["error_vs_one_device"] < 1e-6 and out["zero3"]["error_vs_one_device"] < 1e-6
