"""Run config parsing, DeepSpeed config completion, vocabulary alignment and tokenizer checks."""

import json

import pytest
import torch

from training.config import ConfigError, identity, load_config, parse_override
from training.deepspeed_config import build_deepspeed_configs
from training.engines import resolve_tokenizer
from training.models import aligned_vocab_size

BASE = """
output_dir: out
teacher: {path: teacher}
student: {config: student.json}
data: {train: data}
loss: {kind: tail, top_k: 5, beta: 2.0}
train: {max_steps: 10, micro_batch_size: 2, grad_accum: 3, lr: 0.001, warmup_steps: 2, min_lr: 0.0001}
parallel: {tensor_parallel: 2, deepspeed_config: DS}
"""


@pytest.fixture
def base(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    path = tmp_path / "run.yaml"
    path.write_text(BASE.replace("DS", str(ds)))
    return str(path)


def test_overrides_are_yaml_scalars(base):
    cfg = load_config(base, ["train.max_steps=20", "loss.beta=0.5", "teacher.revision=null", "loss.kind=kl",
                             "student.config=null", "student.path=s"])
    assert (cfg.train.max_steps, cfg.loss.beta, cfg.loss.kind, cfg.student.path) == (20, 0.5, "kl", "s")
    assert parse_override("a.b=") == (["a", "b"], None)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "train.max_stepz: unknown key"),
    ("bogus=1", "bogus: unknown key"),
    ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
    ("train.max_steps=2.5", "train.max_steps: expected int"),
    ("loss.kind=js", "loss.kind: must be one of tail, topk_bucket, kl, reverse_kl, ce"),
    ("loss.ce_weight=2", "loss.ce_weight: must be in [0, 1]"),
    ("train.stop_at_step=11", "train.stop_at_step: must be in [1, train.max_steps=10]"),
    ("student.path=s", "student: set exactly one of student.path and student.config"),
    ("teacher.path=null", "teacher.path: required for loss.kind 'tail'"),
    ("teacher.trust_remote_code=true", "teacher.trust_remote_code: requires teacher.revision"),
    ("train=3", "train: expected a mapping"),
    ("nokey", "--set 'nokey': expected key=value"),
])
def test_bad_values_name_the_key(base, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(base, [override])
    assert str(error.value).startswith(message)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_deepspeed_config_is_completed_from_the_run_config(base):
    cfg = load_config(base)
    student, teacher, zero_only, _ = build_deepspeed_configs(cfg, world_size=4, bf16=False)
    assert student["train_micro_batch_size_per_gpu"] == 2 and student["gradient_accumulation_steps"] == 3
    assert student["tensor_parallel"] == {"autotp_size": 2, "vocab_parallel_lm_head": True}
    assert student["optimizer"]["params"]["lr"] == 0.001
    assert student["scheduler"]["params"]["cos_min_ratio"] == pytest.approx(0.1)
    assert "optimizer" not in teacher and teacher["tensor_parallel"]["autotp_size"] == 2
    assert "tensor_parallel" not in zero_only


@pytest.mark.parametrize("ds, message", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu is 8 but the run config implies 2"),
    ({"tensor_parallel": {"autotp_size": 4}}, "tensor_parallel.autotp_size is 4 but the run config implies 2"),
    ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage must be 0, 1, 2, 3 or \"auto\" for the student, got 4"),
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage: the student's ZeRO stage 0 .* trains in fp32 only"),
    ({"train_batch_size": 7}, "train_batch_size disagrees"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}},
     "zero_optimization.zero_hpz_partition_size > 1 does not work with tensor parallelism "
     r"\(parallel.tensor_parallel=2\)"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, "data_types.grad_accum_dtype is 'bf16' but the run config implies"),
])
def test_deepspeed_config_disagreements_are_refused(base, tmp_path, ds, message):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_configs(load_config(base, [f"parallel.deepspeed_config={path}"]), world_size=4, bf16=True)


def test_bf16_accumulates_gradients_in_fp32_and_hpz_is_allowed_without_tensor_parallelism(base, tmp_path):
    path = tmp_path / "hpz.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}))
    cfg = load_config(base, [f"parallel.deepspeed_config={path}", "parallel.tensor_parallel=1"])
    student, teacher, _, _ = build_deepspeed_configs(cfg, world_size=16, bf16=True)
    assert student["data_types"] == {"grad_accum_dtype": "fp32"} and student["bf16"] == {"enabled": True}
    assert "data_types" not in build_deepspeed_configs(cfg, world_size=16, bf16=False)[0]


def test_the_students_zero_stage_comes_from_the_json_or_the_run_config(base, tmp_path):
    def stage(json_stage, *overrides):
        path = tmp_path / "stage.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": json_stage}}))
        cfg = load_config(base, [f"parallel.deepspeed_config={path}", *overrides])
        configs = build_deepspeed_configs(cfg, world_size=4, bf16=False)
        assert configs.frozen["zero_optimization"]["stage"] == 3  # frozen engines stay ZeRO-3
        return configs.student_stage

    assert stage("auto") == 3 and stage("auto", "parallel.student_zero_stage=1") == 1
    assert stage(2) == 2 and stage(2, "parallel.student_zero_stage=2") == 2
    with pytest.raises(ConfigError, match="parallel.student_zero_stage is 1 but .* sets zero_optimization.stage 2"):
        stage(2, "parallel.student_zero_stage=1")
    with pytest.raises(ConfigError, match="parallel.student_zero_stage: must be 0, 1, 2, 3 or auto, got 4"):
        load_config(base, ["parallel.student_zero_stage=4"])
    # Stage 0 (plain data parallelism): fp32 at TP 1 only, from either key; refused by name otherwise.
    assert stage("auto", "parallel.student_zero_stage=0", "parallel.tensor_parallel=1") == 0
    assert stage(0, "parallel.tensor_parallel=1") == 0
    with pytest.raises(ConfigError, match="zero_optimization.stage: the student's ZeRO stage 0 .* needs "
                                          "parallel.tensor_parallel 1, got 2"):
        stage("auto", "parallel.student_zero_stage=0")
    cfg = load_config(base, [f"parallel.deepspeed_config={tmp_path / 'stage.json'}", "parallel.tensor_parallel=1",
                             "parallel.student_zero_stage=0"])  # the JSON's stage: "auto"
    with pytest.raises(ConfigError, match="stage 0 .* trains in fp32 only, and this run is bf16"):
        build_deepspeed_configs(cfg, world_size=4, bf16=True)


def test_tensor_parallel_must_divide_the_world(base):
    with pytest.raises(ConfigError, match="parallel.tensor_parallel: 2 does not divide the world size 3"):
        build_deepspeed_configs(load_config(base), world_size=3, bf16=False)


def test_vocabulary_alignment():
    assert aligned_vocab_size([1000, 1024], 1000, 2) == 1024
    assert aligned_vocab_size([1001, 1001], 1000, 4) == 1004
    with pytest.raises(ConfigError, match="cannot be aligned"):
        aligned_vocab_size([900, 1024], 1000, 2)


def test_padded_vocabulary_columns_are_masked():
    from training.step import mask_vocab_padding

    logits = torch.zeros(3, 8)
    mask_vocab_padding(logits, vocab_start=8, real_vocab_size=13)  # this slice holds ids 8..15; 13.. are padding
    assert torch.isinf(logits[:, 5:]).all() and (logits[:, :5] == 0).all()


def test_tokenizer_mismatch_is_refused(base, tokenizer_dir, tmp_path, demo_dir):
    from data.tokenizer import train_tokenizer

    other = tmp_path / "teacher"
    train_tokenizer([str(demo_dir / "pretrain/eval.txt")], str(other), vocab_size=400)
    cfg = load_config(base, [f"tokenizer={tokenizer_dir}", f"teacher.path={other}"])
    with pytest.raises(ConfigError, match="teacher.path: .* ships a tokenizer whose token→id map differs"):
        resolve_tokenizer(cfg.tokenizer, cfg.teacher.path, cfg.student.path)
    assert len(resolve_tokenizer(str(tokenizer_dir), "missing", None)) == 512


def test_identity_holds_what_a_resume_must_match(base):
    keys = identity(load_config(base))
    assert {"teacher.path", "tokenizer", "loss.kind", "loss.top_k", "loss.beta", "data.train", "seed"} <= set(keys)
    assert "train.max_steps" not in keys
    # How, not what, is computed: free to change on resume.
    assert "teacher.attn_implementation" not in keys and "train.activation_checkpointing" not in keys
    assert "parallel.teacher_placement" not in keys


@pytest.mark.parametrize("name, world_size", [("demo_teacher", 2), ("demo_teacher_large", 2), ("demo_distill", 2),
                                              ("demo_sft_teacher", 2), ("demo_sft_distill", 2), ("gemma2_9b_to_1b", 16)])
def test_shipped_configs_are_valid(name, world_size):
    """Each shipped YAML loads and completes its DeepSpeed JSON: the run config's values, read here
    from the files themselves, land in DeepSpeed's keys, and the JSON's own settings survive."""
    import os

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raw = yaml.safe_load(open(os.path.join(root, "launch/configs", f"{name}.yaml")))
    shipped_json = json.load(open(os.path.join(root, raw["parallel"]["deepspeed_config"])))
    cfg = load_config(os.path.join(root, "launch/configs", f"{name}.yaml"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        student, teacher, zero_only, _ = build_deepspeed_configs(cfg, world_size=world_size,
                                                              bf16=raw["train"].get("dtype") == "bf16")
    finally:
        os.chdir(cwd)
    assert student["train_micro_batch_size_per_gpu"] == raw["train"]["micro_batch_size"]
    assert student["gradient_accumulation_steps"] == raw["train"]["grad_accum"]
    assert student["tensor_parallel"]["autotp_size"] == raw["parallel"]["tensor_parallel"]
    assert student["optimizer"]["params"]["lr"] == raw["train"]["lr"]
    assert student["optimizer"]["params"]["betas"] == shipped_json["optimizer"]["params"]["betas"]
    # The JSONs say "stage": "auto": the run config's parallel.student_zero_stage (default 3) fills it;
    # its own "auto" is the job's to resolve (training.auto_stage) and counts as absent here.
    chosen = raw["parallel"].get("student_zero_stage")
    assert student["zero_optimization"] == {**shipped_json["zero_optimization"],
                                            "stage": 3 if chosen in (None, "auto") else chosen}
    assert student["bf16"]["enabled"] == (raw["train"].get("dtype") == "bf16")
    assert "optimizer" not in teacher and "tensor_parallel" not in zero_only
