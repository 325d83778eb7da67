"""A tied Gemma-2 student across a universal resume: the head record decides, before any model is built.

Gemma-2 (tied, scaled embedding) is tied at tensor_parallel 1 and untied at > 1. A checkpoint saved
untied (TP 2) and resumed at TP 1 would drop the trained head: ``plan_resume``'s decision refuses it
by name, reading only ``layout.json`` and the student's config (no DeepSpeed checkpoint needed).
The other direction (tied at TP 1, untied at TP 2) is converted: ``tests/test_checkpoint_save.py``
checks the conversion on a real save.
"""

import json

import pytest

from core.errors import CheckpointError
from training.checkpoint import publish
from training.resume import _check_head, _decide
from training.config import (CheckpointConfig, DataConfig, ParallelConfig, RunConfig, StudentConfig, TeacherConfig,
                             identity)
from tests.tiny_models import gemma2, llama

GEMMA_HEAD = {"tied": False, "head": "lm_head.weight", "embedding": "model.embed_tokens.weight",
              "scaled_embedding": True}


def _cfg(tmp_path, student_config, tensor_parallel, resume="auto"):
    return RunConfig(output_dir=str(tmp_path / "run"), teacher=TeacherConfig(path="teacher"),
                     student=StudentConfig(config=student_config), data=DataConfig(train="train"),
                     parallel=ParallelConfig(tensor_parallel=tensor_parallel), checkpoint=CheckpointConfig(resume=resume))


@pytest.fixture
def gemma_config(tmp_path):
    path = tmp_path / "gemma2.json"
    gemma2(512, layers=1).to_json_file(str(path))
    return str(path)


def _checkpoint(tmp_path, cfg, head, tensor_parallel=2):
    """A published step_4 whose layout.json says how its head was saved (no shards: the decision
    must not need them)."""
    root = tmp_path / "saved"
    (root / "step_4").mkdir(parents=True)
    (root / "step_4" / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    layout = {"tensor_parallel": tensor_parallel, "data_parallel": 1, "global_batch_size": 4 * tensor_parallel,
              "world_size": tensor_parallel, "zero_stage": 3, "zero_partitions": {}, "head": head}
    publish(str(root), "step_4", 4, {"step": 4, "sampler": {"consumed_samples": 16}, "run_identity": identity(cfg),
                                     "layout": layout})
    return str(root / "step_4")


def test_an_untied_head_resumed_where_it_is_tied_is_refused_by_name(tmp_path, gemma_config):
    cfg = _cfg(tmp_path, gemma_config, tensor_parallel=1)
    cfg.checkpoint.resume = _checkpoint(tmp_path, cfg, GEMMA_HEAD)
    cfg.train.grad_accum = 2  # the saved global batch: 4 x 2 at DP 1 (TP 2, 2 ranks) = 4 x 2 x DP 1 here
    with pytest.raises(CheckpointError) as error:
        _decide(cfg, world_size=1, student_stage=3)
    message = str(error.value)
    assert message.startswith("checkpoint step_4 was saved at parallel.tensor_parallel=2, where the student's tied "
                              "head is untied (lm_head.weight trained apart from its scaled embedding "
                              "model.embed_tokens.weight); this run uses tensor_parallel=1")
    assert "\n" not in message
    # Refused before conversion: nothing was written beside the tag.
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["latest", "step_4"]


@pytest.mark.parametrize("head, saved_tp, tp, student, refused", [
    (GEMMA_HEAD, 2, 1, "gemma", True),     # untied at TP 2, tied again at TP 1: a trained matrix dropped
    (GEMMA_HEAD, 2, 4, "gemma", False),    # untied at both sizes
    ({**GEMMA_HEAD, "tied": True}, 1, 2, "gemma", False),  # tied -> untied: converted (head = the tied matrix)
    ({**GEMMA_HEAD, "scaled_embedding": False}, 2, 1, "llama", False),  # a plain untied Llama stays untied
    (GEMMA_HEAD, 2, 1, "llama_untied", False),  # the student's own config is untied: untied at TP 1 too
    (None, 2, 1, "gemma", False),          # no record (a non-HF module): nothing to compare
])
def test_which_layout_changes_drop_a_head(tmp_path, gemma_config, head, saved_tp, tp, student, refused):
    configs = {"gemma": gemma_config}
    for name, tie in (("llama", False), ("llama_untied", False)):
        configs[name] = str(tmp_path / f"{name}.json")
        llama(512, tie=tie).to_json_file(configs[name])
    cfg = _cfg(tmp_path, configs[student], tensor_parallel=tp)
    layout = {"tensor_parallel": saved_tp, "head": head}
    if refused:
        with pytest.raises(CheckpointError, match=f"saved at parallel.tensor_parallel={saved_tp}.*"
                                                  f"this run uses tensor_parallel={tp}"):
            _check_head(cfg, "step_4", layout)
    else:
        _check_head(cfg, "step_4", layout)
    assert json.load(open(gemma_config))["tie_word_embeddings"] is True
