"""Checkpoint publication, verification and the resume decision (no DeepSpeed needed)."""

import os

import pytest

from training.checkpoint import COMPLETE, LATEST, find_resume, publish, verify
from training.resume import refuse_drift
from core.errors import CheckpointError


def _save(root, step, ranks=2):
    """What every rank's save_checkpoint leaves (one shard per rank), then rank 0's publication."""
    tag = f"step_{step}"
    os.makedirs(root / tag, exist_ok=True)
    for rank in range(ranks):
        (root / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1024))
    publish(str(root), tag, step, {"step": step, "layout": {"tensor_parallel": 2, "data_parallel": 1}})
    return tag


def _warnings():
    messages = []
    return messages, messages.append


def test_complete_checkpoint_is_found_and_verified(tmp_path):
    _save(tmp_path, 4)
    _save(tmp_path, 8)
    assert find_resume("auto", str(tmp_path)) == (str(tmp_path), "step_8")
    assert find_resume(str(tmp_path / "step_4"), "") == (str(tmp_path), "step_4")
    assert find_resume("auto", str(tmp_path / "nothing")) is None
    assert find_resume("never", str(tmp_path)) is None


@pytest.mark.parametrize("damage, message", [
    ("truncate", "step_8/zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes, the manifest says 4096"),
    ("remove", "step_8/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
    ("flip", "step_8/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256 in the manifest"),
    ("marker", "checkpoint step_8: incomplete"),
    ("empty latest", f"{LATEST} is empty"),
    ("dangling latest", f"{LATEST} names 'step_12', which does not exist"),
    ("no latest", f"{LATEST} is missing"),
])
def test_damage_is_refused_naming_the_file_and_tag_or_falls_back(tmp_path, damage, message):
    _save(tmp_path, 4)
    _save(tmp_path, 8)
    shard = tmp_path / "step_8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "remove":
        shard.unlink()
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[7] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "marker":
        (tmp_path / "step_8" / COMPLETE).unlink()
    elif damage == "empty latest":
        (tmp_path / LATEST).write_text("")
    elif damage == "dangling latest":
        (tmp_path / LATEST).write_text("step_12")
    else:
        (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError) as error:
        find_resume("auto", str(tmp_path), warn=lambda message: None)
    assert message in str(error.value) and "\n" not in str(error.value)
    messages, warn = _warnings()
    expected = "step_4" if damage in ("truncate", "remove", "flip", "marker") else "step_8"
    assert find_resume("auto", str(tmp_path), fallback=True, warn=warn) == (str(tmp_path), expected)
    assert any("checkpoint.fallback: resuming from" in m for m in messages)


def test_an_incomplete_tag_is_ignored_with_a_warning(tmp_path):
    _save(tmp_path, 4)
    os.makedirs(tmp_path / "step_8")
    (tmp_path / "step_8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"partial")
    messages, warn = _warnings()
    assert find_resume("auto", str(tmp_path), warn=warn) == (str(tmp_path), "step_4")
    assert messages == [f"warning: checkpoint {tmp_path / 'step_8'} is incomplete (no COMPLETE marker); ignoring it"]
    # A fresh run whose only checkpoint never completed starts over, after the same warning.
    (tmp_path / "step_4" / COMPLETE).unlink()
    (tmp_path / LATEST).unlink()
    assert find_resume("auto", str(tmp_path), warn=lambda message: None) is None


def test_extra_file_in_a_tag_is_refused(tmp_path):
    _save(tmp_path, 4)
    (tmp_path / "step_4" / "stray.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="stray.pt is not in the manifest"):
        verify(str(tmp_path), "step_4")


def test_config_drift_lists_keys_and_accepts_named_changes():
    saved = {"loss.beta": 2.0, "loss.top_k": 10, "teacher.path": "t"}
    with pytest.raises(CheckpointError) as error:
        refuse_drift(saved, {"loss.beta": 1.0, "loss.top_k": 5, "teacher.path": "t"}, "step_4")
    assert "loss.beta: checkpoint 2.0 vs config 1.0; loss.top_k: checkpoint 10 vs config 5" in str(error.value)
    assert "allow_config_change=loss.beta,loss.top_k" in str(error.value)
    refuse_drift(saved, {"loss.beta": 1.0, "loss.top_k": 10, "teacher.path": "t"}, "step_4", ["loss.beta"])


def test_universal_conversion_refuses_a_checkpoint_without_its_partition_record(tmp_path):
    from training.universal import convert

    tag = _save(tmp_path, 4)  # a layout.json as written before zero_partitions was recorded
    with pytest.raises(CheckpointError, match=r"checkpoint step_4: .*step_4/layout.json has no zero_partitions record"):
        convert(str(tmp_path), tag)
    assert not os.path.exists(tmp_path / "step_4_universal")
    assert not [name for name in os.listdir(tmp_path) if "universal" in name]  # no staging left either
