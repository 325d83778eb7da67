"""A real checkpoint save on 2 gloo ranks: tensor collectives only, and what it records.

A tied Gemma-2 student (scaled embedding) is built as the job builds it (ZeRO-3, ``zero.Init``,
TP 1 x DP 2), takes one AdamW step and is saved by ``training.checkpoint.save`` while every object
collective of ``torch.distributed`` (through which ``deepspeed.comm`` calls too) raises. The tag must
verify against its manifest, load into a fresh engine with the same weights and optimizer state,
record each rank's ZeRO-3 partitioning as the ranks themselves report it, and record the tied
head, whose universal conversion files the tied matrix under the head's name as well.
"""

import json
import os

import pytest
import torch

from model_parallel.spawn import run_on_ranks
from tests.tiny_models import gemma2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
pytestmark = pytest.mark.e2e  # every test here reads the one save trained on 2 DeepSpeed ranks


def _engine(config_path, seed):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from training.config import StudentConfig
    from training.deepspeed_config import frozen_deepspeed_configs
    from training.engines import _build_model

    zero_only = frozen_deepspeed_configs(os.path.join(ROOT, "ds_configs/zero3_tp.json"), tensor_parallel=1,
                                         world_size=2, micro_batch_size=1, bf16=False).zero_only
    hf_ds_config = HfDeepSpeedConfig(zero_only)  # noqa: F841 -- transformers finds it while the model loads
    model = _build_model(StudentConfig(config=config_path), "student", 512, zero_only, torch.float32, 1,
                         frozen=False, seed=seed)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))
    return engine


def _state(engine):
    """Every parameter whole, and this rank's fp32 partitions and Adam moments (host copies)."""
    import deepspeed

    params = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            params[name] = param.detach().to("cpu", copy=True)
    optimizer = engine.optimizer
    moments = [{key: optimizer.optimizer.state[flat][key].detach().clone() for key in ("exp_avg", "exp_avg_sq")}
               for flat in optimizer.fp32_partitioned_groups_flat]
    return params, [flat.detach().clone() for flat in optimizer.fp32_partitioned_groups_flat], moments


def _rank(rank, world_size, config_path, root):
    import torch.distributed as dist

    from training import checkpoint
    from training.resume import ResumePlan

    engine = _engine(config_path, seed=5)
    ids = torch.arange(1 + 7 * rank, 17 + 7 * rank).view(1, 16)  # another sequence per rank
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
    engine.step()
    own = [os.path.basename(engine._get_zero_ckpt_name("", "")),
           [[engine.optimizer._get_sub_group_partition_count(i), engine.optimizer._get_sub_group_partition_rank(i)]
            for i in range(len(engine.optimizer.fp16_groups))]]

    def refuse(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"{name} ran during a checkpoint save")
        return raising

    originals = {name: getattr(dist, name) for name in OBJECT_COLLECTIVES}
    for name in OBJECT_COLLECTIVES:
        setattr(dist, name, refuse(name))
    try:
        layout = {"tensor_parallel": 1, "data_parallel": 2, "global_batch_size": 2, "world_size": 2, "zero_stage": 3}
        tag = checkpoint.save(engine, root, 1, {"step": 1, "layout": layout}, keep=2)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    saved = _state(engine)
    from model_parallel.byte_gather import all_gather_bytes

    uneven = all_gather_bytes(bytes(range(250, 250 - 5 * rank, -1)), device=engine.device)  # 0 and 5 bytes
    fresh = _engine(config_path, seed=6)  # other weights until the load
    ResumePlan(root=root, tag=tag, load_tag=tag).restore(fresh)
    return {"tag": tag, "own": own, "saved": saved, "loaded": _state(fresh), "uneven": uneven}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("save")
    config_path = str(root / "gemma2.json")
    gemma2(512, layers=1).to_json_file(config_path)
    results = run_on_ranks(2, _rank, config_path, str(root / "checkpoints"), deepspeed=True, timeout=300)
    return str(root / "checkpoints"), results


def test_a_save_runs_no_object_collective_and_resumes(saved):
    from training.checkpoint import verify

    root, results = saved
    assert [r["tag"] for r in results] == ["step_1", "step_1"]
    verify(root, "step_1")
    for result in results:
        (params, flats, moments), (loaded_params, loaded_flats, loaded_moments) = result["saved"], result["loaded"]
        assert params.keys() == loaded_params.keys()
        for name in params:
            assert torch.equal(params[name], loaded_params[name]), name
        for flat, loaded in zip(flats, loaded_flats):
            assert torch.equal(flat, loaded)
        for moment, loaded in zip(moments, loaded_moments):
            assert all(torch.equal(moment[key], loaded[key]) for key in moment)
            assert moment["exp_avg"].abs().sum() > 0  # the step left real optimizer state to compare


def test_bytes_of_uneven_lengths_come_back_whole_on_every_rank(saved):
    _, results = saved
    assert [r["uneven"] for r in results] == [[b"", bytes([250, 249, 248, 247, 246])]] * 2


def test_the_layout_records_each_ranks_partitions_and_the_tied_head(saved):
    from training.checkpoint import read_layout

    root, results = saved
    layout = read_layout(root, "step_1")
    assert layout["zero_partitions"] == dict(result["own"] for result in results)
    optimizer_files = sorted(name for name in os.listdir(os.path.join(root, "step_1")) if "optim_states" in name)
    assert sorted(layout["zero_partitions"]) == optimizer_files
    assert layout["head"] == {"tied": True, "head": "lm_head.weight", "embedding": "model.embed_tokens.weight",
                              "scaled_embedding": True}
    assert json.load(open(os.path.join(root, "step_1", "client_state.json")))["layout"] == layout


def test_universal_conversion_files_the_tied_matrix_under_the_heads_name(saved):
    from training.universal import convert

    root, results = saved
    target = os.path.join(root, convert(root, "step_1"), "zero")
    embedding = results[0]["saved"][0]["model.embed_tokens.weight"]
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        tied = torch.load(os.path.join(target, "model.embed_tokens.weight", f"{key}.pt"), weights_only=False)
        head = torch.load(os.path.join(target, "lm_head.weight", f"{key}.pt"), weights_only=False)
        assert torch.equal(head["param"], tied["param"]), key
    # The TP-1 merge keeps the matrix flat; a TP > 1 load cuts its shard out of it by the head's shape.
    head = torch.load(os.path.join(target, "lm_head.weight", "fp32.pt"), weights_only=False)["param"]
    assert torch.equal(head.reshape(-1), embedding.reshape(-1))
