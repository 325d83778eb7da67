"""On-policy distillation in the job, on spawned DeepSpeed ranks (CPU, gloo): one spawn of 2 ranks
runs every check, since each launch costs tens of seconds here.

- The job at TP 2 with a ZeRO-3 student, on SFT rows: λ = 0 with other on_policy keys changed is
  today's run, bitwise; λ = 0.5 draws on- and off-policy steps as ``is_on_policy`` says, logs the
  ``gen/`` scalars, and a run stopped and resumed is bitwise equal to a straight one.
- Generation on the student that run trained, and on a fresh Gemma-2: the same tokens (≥ 99%) at
  TP 2 and at TP 1 (ZeRO-3 over 2 data-parallel ranks), and ZeRO-3 gathers the student once per
  call, not once per token.
"""

import json
import os

import pytest
import torch
import yaml

from tests.tiny_models import gemma2, llama, save_model

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_VOCAB, PADDED_VOCAB = 512, 520
STEPS, SEED = 4, 5
ON_POLICY = {"fraction": 0.5, "prompt_tokens": 8, "max_new_tokens": 12, "temperature": 1.0}


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as lines:
        records = [json.loads(line) for line in lines]
    timing = ("tokens_per_s", "gen/seconds", "peak_memory_gb")  # measured, not computed
    return {record["step"]: {k: v for k, v in record.items() if k not in timing} for record in records}


def _jobs(config_path, root):
    from training.config import load_config
    from training.job import run

    def job(name, *overrides):
        output_dir = os.path.join(root, name)
        run(load_config(config_path, [f"output_dir={output_dir}", *overrides]))
        return _metrics(output_dir)

    on = [f"on_policy.{key}={value}" for key, value in ON_POLICY.items()]
    return {
        "today": job("today"),
        "lambda0": job("lambda0", "on_policy.fraction=0", "on_policy.prompt_tokens=3", "on_policy.temperature=0"),
        "straight": job("straight", *on),
        "resumed_first": job("resumed", *on, f"train.stop_at_step={STEPS // 2}"),
        "resumed": job("resumed", *on),
    }


def _prompts(data_dir, tokenizer, rows):
    """The first ``rows`` SFT prompts of the training data, as the on-policy step takes them."""
    from data.loader import Collator, load_prepared
    from training.config import OnPolicyConfig
    from training.on_policy import prompts

    dataset, manifest = load_prepared(data_dir)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(rows)])
    return prompts(batch, OnPolicyConfig(fraction=1.0, max_new_tokens=24), sft=True, seq_len=manifest["seq_len"],
                   pad_token_id=tokenizer.pad_token_id)


def _generation_rank(rank, world_size, config_path, students, overrides):
    """Per student (name → config overrides): the tokens it writes on this layout and, under
    ZeRO-3, the bytes gathered for 4 and for 16 new tokens. No teacher (``ce``, off-policy):
    generation needs none."""
    from model_parallel.testing.comm_counter import count_collective_bytes
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.generation import Sampling, generate

    out = {}
    for name, student in students.items():
        cfg = load_config(config_path, [*student, "loss.kind=ce", *overrides])
        engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                                bf16=False)
        prompt = _prompts(cfg.data.train, engines.tokenizer, rows=24)
        device = engines.device

        def write(new_tokens):
            return generate(engines.student, prompt.ids.to(device), prompt.mask.to(device),
                            max_new_tokens=new_tokens, sampling=Sampling(temperature=1.0, seed=SEED, step=7),
                            sequence=torch.arange(24), vocab_start=engines.vocab_start,
                            real_vocab_size=engines.real_vocab_size, tp_group=engines.tp_group)

        out[name] = {"tokens": write(24).tolist()}
        if engines.student.zero_optimization_stage() == 3:
            gathered = {}
            for new_tokens in (4, 16):
                with count_collective_bytes() as counted:
                    write(new_tokens)
                gathered[new_tokens] = sum(b for n, b in counted.bytes.items() if n.startswith("all_gather"))
            out[name]["zero3_gathered_bytes"] = gathered
            out[name]["student_bytes"] = sum(p.ds_numel * 4 for p in engines.student.module.parameters())
    return out


def _rank(rank, world_size, config_path, root):
    return _jobs(config_path, root)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tokenizer_dir, tokenizer, demo_dir):
    from data.prepare import prepare
    from model_parallel.spawn import run_on_ranks

    root = tmp_path_factory.mktemp("on_policy_job")
    prepare(str(tokenizer_dir), [str(demo_dir / "sft/train.jsonl")], str(root / "train"), fmt="sft", seq_len=64)
    llama(REAL_VOCAB, hidden=32, layers=1).to_json_file(str(root / "student.json"))
    ds = json.load(open(os.path.join(ROOT, "ds_configs/zero3_tp.json")))
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    (root / "ds.json").write_text(json.dumps(ds))
    config = {"seed": SEED, "tokenizer": str(tokenizer_dir),
              "teacher": {"path": save_model(llama(PADDED_VOCAB, hidden=48), root / "teacher", tokenizer)},
              "student": {"config": str(root / "student.json")}, "data": {"train": str(root / "train")},
              "loss": {"kind": "tail", "top_k": 5, "beta": 1.0, "beta_mode": "sequence"},
              "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                        "min_lr": 3e-4, "dtype": "fp32"},
              "parallel": {"deepspeed_config": str(root / "ds.json"), "tensor_parallel": 2,
                           "student_zero_stage": 3},
              "checkpoint": {"every": 100}, "logging": {"every": 1}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = run_on_ranks(2, _rank, str(path), str(root), deepspeed=True, timeout=900)
    # The student the λ 0.5 run trained, and a fresh Gemma-2 (soft-caps, sliding windows; its tied
    # head untied at TP 2) drawn from the seed alone, so the same weights on both layouts.
    gemma2(REAL_VOCAB, layers=2, sliding_window=8).to_json_file(str(root / "gemma_student.json"))
    students = {"llama": [f"student.path={root / 'straight' / 'student'}", "student.config=null"],
                "gemma2": [f"student.config={root / 'gemma_student.json'}"]}
    # One layout per spawn: DeepSpeed's tensor-parallel state is per process.
    generations = {name: run_on_ranks(2, _generation_rank, str(path), students, overrides, deepspeed=True,
                                      timeout=600)
                   for name, overrides in (("tp2", ["parallel.tensor_parallel=2", "parallel.student_zero_stage=1"]),
                                           ("tp1_zero3", ["parallel.tensor_parallel=1",
                                                          "parallel.student_zero_stage=3"]))}
    return {"jobs": jobs[0], "generations": generations}


def test_lambda_zero_is_todays_run_bit_for_bit(ranks):
    jobs = ranks["jobs"]
    assert sorted(jobs["today"]) == list(range(1, STEPS + 1))
    assert jobs["lambda0"] == jobs["today"]
    assert not any(key.startswith("gen/") or key == "on_policy" for record in jobs["today"].values()
                   for key in record)


def test_on_policy_steps_follow_the_draw_and_log_what_they_generated(ranks):
    from training.on_policy import is_on_policy

    straight = ranks["jobs"]["straight"]
    drawn = [is_on_policy(SEED, step, ON_POLICY["fraction"]) for step in range(1, STEPS + 1)]
    assert any(drawn) and not all(drawn), "pick a seed whose 4 steps mix on- and off-policy"
    for step, on in zip(range(1, STEPS + 1), drawn):
        record = straight[step]
        assert record["on_policy"] == float(on)
        assert ("gen/mean_length" in record) == on
        if on:
            assert 0 < record["gen/mean_length"] <= ON_POLICY["max_new_tokens"]
            assert 0 <= record["gen/eos_fraction"] <= 1
    today = ranks["jobs"]["today"]
    first_on = drawn.index(True) + 1
    assert straight[first_on]["loss"] != today[first_on]["loss"]  # the student's own tokens, not the data's


def test_a_resumed_on_policy_run_is_bitwise_the_straight_one(ranks):
    jobs = ranks["jobs"]
    assert sorted(jobs["resumed_first"]) == list(range(1, STEPS // 2 + 1))
    assert {**jobs["resumed_first"], **jobs["resumed"]} == jobs["straight"]


@pytest.mark.parametrize("student", ["llama", "gemma2"])
def test_a_student_samples_the_same_tokens_at_tp1_and_tp2(ranks, student):
    tp2, tp1 = ranks["generations"]["tp2"], ranks["generations"]["tp1_zero3"]
    assert tp2[0][student]["tokens"] == tp2[1][student]["tokens"]  # both tensor-parallel ranks draw the same
    assert tp1[0][student]["tokens"] == tp1[1][student]["tokens"]  # both data-parallel ranks had the same prompts
    same = (torch.tensor(tp1[0][student]["tokens"]) == torch.tensor(tp2[0][student]["tokens"])).float().mean().item()
    assert same >= 0.99, f"{same:.3%} of tokens agree between TP 1 and TP 2"


def test_zero3_gathers_the_student_once_per_generation_call(ranks):
    zero3 = ranks["generations"]["tp1_zero3"][0]["llama"]
    gathered = zero3["zero3_gathered_bytes"]
    # Once per call: the same bytes for 4 and for 16 new tokens, about the student once (this
    # rank's all-gather input is its partition: half the student over 2 ranks, padded).
    assert gathered[4] == gathered[16]
    assert 0.4 * zero3["student_bytes"] <= gathered[4] <= 0.7 * zero3["student_bytes"]
