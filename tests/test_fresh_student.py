"""A fresh student (``student.config``) starts from the same weights at every ZeRO stage.

On 2 gloo ranks whose global RNGs differ, the same Llama and Gemma-2 (tied, scaled embedding)
configs are built as the job builds them: partitioned under ``zero.Init`` (stage 3) and whole on
the host (stages 1 and 2), in fp32 and bf16. Every gathered tensor must be bitwise equal across
stages and ranks, bf16 must be fp32 rounded, and the draw must still be Hugging Face's own
initialisation, moved by the seed.
"""

import json
import os

import pytest
import torch

from model_parallel.spawn import run_on_ranks
from tests.tiny_models import gemma2, llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _full_state(model) -> dict:
    """Every parameter whole, on the host (gathered where ZeRO-3 partitioned it)."""
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            state[name] = param.detach().to("cpu", copy=True)
    return state


def _rank(rank, world_size, configs, ds_path):
    from transformers.integrations import HfDeepSpeedConfig

    from training.config import StudentConfig
    from training.deepspeed_config import frozen_deepspeed_configs
    from training.engines import _build_model

    zero_only = frozen_deepspeed_configs(ds_path, tensor_parallel=1, world_size=world_size, micro_batch_size=1,
                                         bf16=False).zero_only
    out = {}
    for name, path in configs.items():
        vocab = json.load(open(path))["vocab_size"]
        for seed in (5, 6):
            for stage, dtype in ((3, torch.float32), (2, torch.float32), (2, torch.bfloat16)):
                torch.manual_seed(100 + rank)  # a different global RNG state on each rank
                hf_ds_config = HfDeepSpeedConfig(zero_only) if stage == 3 else None
                model = _build_model(StudentConfig(config=path), "student", vocab, zero_only if stage == 3 else None,
                                     dtype, 1, frozen=False, seed=seed)
                out[(name, seed, stage, dtype)] = _full_state(model)
                del model, hf_ds_config
    return out


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    configs = {}
    for name, config in (("llama", llama(512, hidden=32)), ("gemma2", gemma2(512))):
        configs[name] = str(root / f"{name}.json")
        config.to_json_file(configs[name])
    return run_on_ranks(2, _rank, configs, os.path.join(ROOT, "ds_configs/zero3_tp.json"), deepspeed=True,
                        timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_every_stage_and_rank_draws_the_same_student(drawn, name):
    reference = drawn[0][(name, 5, 3, torch.float32)]
    for per_rank in drawn:
        for key in ((name, 5, 3, torch.float32), (name, 5, 2, torch.float32)):
            state = per_rank[key]
            assert state.keys() == reference.keys()
            for tensor in reference:
                assert torch.equal(state[tensor], reference[tensor]), (key, tensor)
        rounded = per_rank[(name, 5, 2, torch.bfloat16)]
        for tensor in reference:
            assert torch.equal(rounded[tensor], reference[tensor].to(torch.bfloat16)), tensor


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_the_draw_is_hugging_faces_initialisation_moved_by_the_seed(drawn, name):
    five, six = drawn[0][(name, 5, 3, torch.float32)], drawn[0][(name, 6, 3, torch.float32)]
    std = 0.02  # initializer_range of both configs (transformers' default)
    for tensor, values in five.items():
        if tensor.endswith("norm.weight"):
            # Llama's RMSNorm scales by w (ones); Gemma-2's by 1 + w (zeros).
            expected = 0.0 if name == "gemma2" else 1.0
            assert torch.equal(values, torch.full_like(values, expected)), tensor
            continue
        rows = values[1:] if "embed_tokens" in tensor else values
        if "embed_tokens" in tensor:  # the padding row (pad_token_id 0) is zero, as transformers draws it
            assert torch.equal(values[0], torch.zeros_like(values[0]))
        # normal(0, 0.02) over thousands of entries: the sample std is within 10% (>= 8 sigma).
        assert abs(float(rows.std()) - std) < 0.1 * std, tensor
        assert not torch.equal(values, six[tensor]), tensor  # another seed, other weights
