"""loss.fused_head in the job: the fused head gives the unfused path's loss, gradients and metrics.

In-process (fast): the config key, the resume rule for keys a checkpoint predates, which models
the fused head takes, and the step's fused micro-batch against its unfused one on plain
transformers models (Llama; tied, soft-capped Gemma-2; a padded vocabulary; SFT masks). On
spawned DeepSpeed ranks (e2e): one step at ZeRO 0-3 (TP 1 x DP 2) and ZeRO 1 and 3 (TP 2), each
engine stepped once unfused and once fused from the same weights (the first step at learning rate
0), every student gradient compared; evaluation fused against unfused on the same engines.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from core.errors import CheckpointError, ConfigError
from tests.tiny_models import gemma2, llama, qwen2, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_VOCAB = 512  # the session tokenizer's size
PADDED_VOCAB = 520  # the models' rows: 8 padded columns, masked to -inf
# fp32 on one host: the fused head forms the same logits row chunk by row chunk (and the gradients
# from them by other matmul shapes), so results agree to fp32 rounding, not bitwise; 1e-5 relative is
# about 100 roundoffs, and a wrong mask, soft-cap or scale is off by far more.
TOLERANCE = 1e-5


def _write_config(path, **overrides):
    raw = {"output_dir": str(path.parent / "run"), "student": {"config": "s.json"}, "teacher": {"path": "t"},
           "data": {"train": "d"}}
    for section, values in overrides.items():
        raw[section] = values
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The key and the resume rule


@pytest.mark.parametrize("text, value", [("auto", "auto"), ("true", True), ("false", False)])
def test_fused_head_takes_auto_or_a_boolean(tmp_path, text, value):
    from training.config import load_config

    assert load_config(_write_config(tmp_path / "c.yaml"), [f"loss.fused_head={text}"]).loss.fused_head == value
    assert load_config(_write_config(tmp_path / "c.yaml")).loss.fused_head == "auto"


@pytest.mark.parametrize("text", ["sometimes", "1", "null"])
def test_other_fused_head_values_are_refused_by_name(tmp_path, text):
    from training.config import load_config

    with pytest.raises(ConfigError, match=r"loss.fused_head: must be auto or true or false, got"):
        load_config(_write_config(tmp_path / "c.yaml"), [f"loss.fused_head={text}"])


def test_fused_head_is_not_part_of_the_run_identity(tmp_path):
    from training.config import identity, load_config

    path = _write_config(tmp_path / "c.yaml")
    on, off = (identity(load_config(path, [f"loss.fused_head={flag}"])) for flag in ("true", "false"))
    assert on == off and not any("fused_head" in key for key in on)


def test_a_key_the_checkpoint_predates_resumes_at_its_default(tmp_path):
    """The general rule: a key missing from a saved run identity (written before the key existed)
    is taken at today's default, so the run resumes where the config holds the default and is
    refused, naming the key, where it does not."""
    from training.config import identity, load_config
    from training.resume import refuse_drift

    path = _write_config(tmp_path / "c.yaml")
    saved = identity(load_config(path))
    del saved["loss.beta_mode"]  # as if beta_mode were added after this checkpoint was written
    refuse_drift(saved, identity(load_config(path)), "step_4")
    with pytest.raises(CheckpointError, match="loss.beta_mode: checkpoint 'constant' vs config 'sequence'"):
        refuse_drift(saved, identity(load_config(path, ["loss.beta_mode=sequence"])), "step_4")
    with pytest.raises(CheckpointError, match="loss.top_k: checkpoint 10 vs config 7"):
        refuse_drift(saved, identity(load_config(path, ["loss.top_k=7"])), "step_4")


# ---------------------------------------------------------------------------------------------
# Which models the fused head takes


def _model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_known_families_are_fused_and_others_are_told_why():
    from transformers import GPT2Config

    from training.models import fused_head_problem

    for config in (llama(64), gemma2(64), qwen2(64)):
        assert fused_head_problem(_model(config)) is None, config.model_type
    gpt2 = _model(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert "does not know its output layer (family 'generic')" in fused_head_problem(gpt2)
    biased = _model(llama(64))
    biased.lm_head = torch.nn.Linear(32, 64, bias=True)
    assert fused_head_problem(biased).endswith("its output layer has a bias")


def test_fused_head_true_is_refused_by_name_where_it_cannot_run(capsys):
    """``true`` names why (another family; DeepCompile, which bypasses the head's module call);
    ``auto`` takes the unfused path there and says why once."""
    from transformers import GPT2Config

    from training.fused_head import install

    def engine(model, deepcompile=False):
        return SimpleNamespace(module=model, is_deepcompile_enabled=lambda: deepcompile, is_compiled=False)

    gpt2 = _model(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match=r"loss.fused_head: true, but the fused head cannot run here \(teacher: "
                                          r"GPT2LMHeadModel .*family 'generic'"):
        install(engine(_model(llama(64))), engine(gpt2), True)
    with pytest.raises(ConfigError, match=r"\(student: DeepSpeed's DeepCompile"):
        install(engine(_model(llama(64)), deepcompile=True), None, True)
    assert install(engine(_model(llama(64)), deepcompile=True), None, "auto") is None
    assert capsys.readouterr().err.strip().splitlines() == [
        "fused head: off (student: DeepSpeed's DeepCompile (compile.deepcompile) replaces the module calls the fused "
        "head runs in)"]
    assert install(engine(_model(llama(64))), None, False) is None
    assert install(engine(_model(llama(64))), None, "auto") is not None


def test_the_final_softcap_is_restored_after_an_error():
    from training.models import without_final_softcap

    model = _model(gemma2(64))
    with pytest.raises(KeyError):
        with without_final_softcap(model) as softcap:
            assert softcap == 30.0 and model.config.final_logit_softcapping is None
            raise KeyError("inside")
    assert model.config.final_logit_softcapping == 30.0


# ---------------------------------------------------------------------------------------------
# The step's fused micro-batch on plain models (one process, no DeepSpeed engine)


def _batches(generator, rows=2, length=16):
    """A pre-training batch (every position has a target) and an SFT one (masked prompts, padded ends)."""
    ids = torch.randint(4, REAL_VOCAB, (rows, length), generator=generator)
    sft = ids.clone()
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, :3] = -100
    labels[1, -4:] = -100  # padding
    sft[1, -4:] = 0
    return [{"input_ids": ids, "labels": ids.clone()}, {"input_ids": sft, "labels": labels}]


def _plain_engines(student, teacher, fused: bool):
    from model_parallel import VocabShard
    from training.fused_head import FusedHeads

    shard = VocabShard(start=0, size=PADDED_VOCAB, global_size=PADDED_VOCAB)
    engines = SimpleNamespace(student=student, teacher=teacher, tp_group=None, vocab_shard=shard, vocab_start=0,
                              real_vocab_size=REAL_VOCAB, device=torch.device("cpu"), fused=None)
    if fused:
        engines.fused = FusedHeads(SimpleNamespace(module=student), SimpleNamespace(module=teacher))
    return engines


def _one_micro_batch(engines, loss_cfg, batch):
    from training.step import _LOGGED, _fused_micro_batch, _positions, _unfused_micro_batch

    engines.student.zero_grad(set_to_none=True)
    where = _positions(batch)
    micro_batch = _fused_micro_batch if engines.fused is not None else _unfused_micro_batch
    loss, out, bad = micro_batch(engines, loss_cfg, {"input_ids": batch["input_ids"]}, where)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in engines.student.named_parameters()}
    return float(loss.detach()), {name: out[name] for name in _LOGGED if name in out}, bool(bad), grads


def _assert_close(fused, unfused, what):
    for name, reference in unfused.items():
        error = float((fused[name] - reference).norm())
        assert error <= TOLERANCE * float(reference.norm()) + 1e-12, (what, name, error)


@pytest.mark.parametrize("kind, family", [("tail", "llama"), ("tail", "gemma2"), ("kl", "gemma2"), ("ce", "llama")])
def test_the_fused_micro_batch_equals_the_unfused_one(kind, family):
    """Loss, per-token outputs and every student gradient (the tied Gemma-2 head's through the
    embedding too), on a pre-training and an SFT batch, padded vocabulary, temperature 2 and a CE
    mix; the models' calls leave the soft-cap and the heads as they were."""
    from training.config import LossConfig

    make = {"llama": lambda hidden: llama(PADDED_VOCAB, hidden=hidden), "gemma2":
            lambda hidden: gemma2(PADDED_VOCAB, hidden=hidden)}[family]
    student, teacher = _model(make(32)), _model(make(48))
    student.train()
    loss_cfg = LossConfig(kind=kind, top_k=5, beta=2.0, temperature=2.0, ce_weight=0.25)
    for batch in _batches(torch.Generator().manual_seed(1)):
        results = {}
        for fused in (False, True):
            engines = _plain_engines(student, teacher, fused)
            results[fused] = _one_micro_batch(engines, loss_cfg, batch)
        (loss_u, out_u, bad_u, grads_u), (loss_f, out_f, bad_f, grads_f) = results[False], results[True]
        assert loss_f == pytest.approx(loss_u, rel=TOLERANCE) and not bad_u and not bad_f
        assert out_f.keys() == out_u.keys() and {"loss", "ce"} <= out_u.keys()
        _assert_close(out_f, out_u, "outputs")
        _assert_close(grads_f, grads_u, "gradients")
    assert getattr(student.config, "final_logit_softcapping", None) == (30.0 if family == "gemma2" else None)
    ids = batch["input_ids"][:, :4]
    assert student(input_ids=ids).logits.shape == (2, 4, PADDED_VOCAB)  # outside a request: the head as it was


# ---------------------------------------------------------------------------------------------
# DeepSpeed engines on spawned ranks: one step unfused, then fused, from the same weights


def _record_gradients(student, store):
    """Wrap ``student.step``: at the accumulation boundary, keep every parameter's full gradient
    (this rank's tensor-parallel slice) and step at learning rate 0, so the weights stay as they were."""
    from deepspeed.utils import safe_get_full_grad

    step = student.step

    def recording_step(*args, **kwargs):
        if student.is_gradient_accumulation_boundary():
            store.clear()
            store.update({name: safe_get_full_grad(param).detach().clone()
                          for name, param in student.module.named_parameters() if param.requires_grad})
            for group in student.optimizer.param_groups:
                group["lr"] = 0.0
        return step(*args, **kwargs)

    student.step = recording_step


def _eval_metrics(engines, loss_cfg, batches):
    from training.step import evaluate

    # Every third id in each frequency band: the tail metrics, too, the same both ways.
    scalars, bins = evaluate(engines, loss_cfg, batches, bands=torch.arange(REAL_VOCAB) % 3)
    return {"scalars": scalars, "bins": bins}


def _case(cfg, world_size, batches):
    """One engine build: the step's loss and gradients unfused and fused, the head's ZeRO-3 state
    after the fused step, and evaluation both ways."""
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.step import step_means, train_step

    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                            bf16=False)
    heads, grads, out = engines.fused, {}, {"fused_installed": engines.fused is not None}
    _record_gradients(engines.student, grads)
    for fused in (False, True):
        engines.fused = heads if fused else None
        result = train_step(engines, cfg.loss, batches)
        out[fused] = {"loss": step_means(result, engines)["loss"], "grads": dict(grads)}
    weight = engines.student.module.get_output_embeddings().weight
    out["head_status"] = str(getattr(weight, "ds_status", None))
    for fused in (False, True):
        engines.fused = heads if fused else None
        out[f"eval_{fused}"] = _eval_metrics(engines, cfg.loss, batches)
    return out


def _engine_rank(rank, world_size, config_path, cases):
    from training.config import load_config

    batches = _batches(torch.Generator().manual_seed(2))
    results = {}
    for name, overrides in cases:
        results[name] = _case(load_config(config_path, overrides), world_size, batches)
    return results


_GEMMA = ["student.config={gemma_student}", "teacher.path={gemma_teacher}"]
# ZeRO 0-3 at TP 1 x DP 2 and ZeRO 1 and 3 at TP 2, each family in both; recomputation and a zero3
# teacher (its head gathered around the fused call) in one.
_TP1_CASES = [("zero0_llama", ["parallel.student_zero_stage=0"]), ("zero1_llama", ["parallel.student_zero_stage=1"]),
              ("zero2_gemma2", ["parallel.student_zero_stage=2", *_GEMMA]),
              ("zero3_gemma2", ["parallel.student_zero_stage=3", *_GEMMA])]
_TP2_CASES = [("zero1_gemma2", ["parallel.student_zero_stage=1", *_GEMMA]),
              ("zero3_llama_recompute_zero3_teacher",
               ["parallel.student_zero_stage=3", "parallel.teacher_placement=zero3",
                "train.activation_checkpointing=true"])]

@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, tokenizer_dir, tokenizer):
    """Per TP size (1, 2), per rank of 2, per case: what :func:`_case` returns. Models: a Llama
    student (512 rows, resized to the teacher's 520) and Llama teacher; a tied, soft-capped Gemma-2
    pair (tied at TP 1, the head untied by the job at TP 2)."""
    from model_parallel.spawn import run_on_ranks

    root = tmp_path_factory.mktemp("fused_engines")
    llama(REAL_VOCAB, hidden=32, layers=1).to_json_file(str(root / "student.json"))
    gemma2(REAL_VOCAB, layers=1).to_json_file(str(root / "gemma_student.json"))
    paths = {"gemma_teacher": save_model(gemma2(PADDED_VOCAB, hidden=48), root / "gemma_teacher", tokenizer),
             "gemma_student": str(root / "gemma_student.json")}
    config = {"output_dir": str(root / "run"), "seed": 5, "tokenizer": str(tokenizer_dir),
              "teacher": {"path": save_model(llama(PADDED_VOCAB, hidden=48), root / "teacher", tokenizer)},
              "student": {"config": str(root / "student.json")}, "data": {"train": str(root)},
              "loss": {"kind": "tail", "top_k": 5, "beta": 2.0, "temperature": 2.0, "ce_weight": 0.25},
              "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 1, "dtype": "fp32"},
              "parallel": {"deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json")}}
    ds = json.load(open(os.path.join(ROOT, "ds_configs/zero3_tp.json")))
    # ZeRO-3 partitions every parameter (none persistent), so the heads are gathered by the module hooks.
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "ds.json").write_text(json.dumps(ds))
    config["parallel"]["deepspeed_config"] = str(root / "ds.json")
    results = {}
    for tp, cases in ((1, _TP1_CASES), (2, _TP2_CASES)):
        path = root / f"tp{tp}.yaml"
        path.write_text(yaml.safe_dump({**config, "parallel": {**config["parallel"], "tensor_parallel": tp}}))
        cases = [(name, [override.format(**paths) for override in overrides]) for name, overrides in cases]
        results[tp] = run_on_ranks(2, _engine_rank, str(path), cases, deepspeed=True, timeout=600)
    return results


def _cases(engine_runs):
    for tp, ranks in engine_runs.items():
        for rank, results in enumerate(ranks):
            for name, result in results.items():
                yield f"tp{tp}/{name}/rank{rank}", result


@pytest.mark.e2e
def test_fused_and_unfused_steps_give_the_same_loss_and_gradients(engine_runs):
    for where, result in _cases(engine_runs):
        assert result["fused_installed"], where
        unfused, fused = result[False], result[True]
        # fp32, the same weights; the fused head's chunked matmuls round differently (see TOLERANCE).
        assert fused["loss"] == pytest.approx(unfused["loss"], rel=TOLERANCE), where
        assert fused["grads"].keys() == unfused["grads"].keys() and len(unfused["grads"]) > 0, where
        _assert_close(fused["grads"], unfused["grads"], where)


@pytest.mark.e2e
def test_zero3_partitions_the_head_again_after_the_fused_step(engine_runs):
    for where, result in _cases(engine_runs):
        expected = "ZeroParamStatus.NOT_AVAILABLE" if "zero3" in where else "None"
        assert result["head_status"] == expected, where


@pytest.mark.e2e
def test_fused_evaluation_gives_the_unfused_metrics(engine_runs):
    for where, result in _cases(engine_runs):
        unfused, fused = result["eval_False"], result["eval_True"]
        assert fused["scalars"].keys() == unfused["scalars"].keys(), where
        for name, value in unfused["scalars"].items():
            # A probability within an ulp of a bin edge may fall on the other side in the chunked
            # matmul: a pair or two change bins, which moves an ECE by about 1/pairs (1e-5 here).
            close = pytest.approx(value, abs=TOLERANCE) if "ece" in name else pytest.approx(value, rel=TOLERANCE)
            assert fused["scalars"][name] == close, (where, name)
        for kind in ("full", "top1"):
            counts_u, confidence_u, hits_u = unfused["bins"][kind]
            counts_f, confidence_f, hits_f = fused["bins"][kind]
            assert sum(abs(a - b) for a, b in zip(counts_u, counts_f)) <= 4, (where, kind)
            assert sum(abs(a - b) for a, b in zip(hits_u, hits_f)) <= 4, (where, kind)
            for a, b in zip(confidence_u, confidence_f):  # a pair that changes bins carries its confidence (< 1)
                assert abs(a - b) <= TOLERANCE * abs(a) + 4, (where, kind)


# ---------------------------------------------------------------------------------------------
# The job (training.job.run, as the launcher runs it), 8 steps with the fused head on and off


def _job_rank(rank, world_size, config_path, output_root):
    from training.config import load_config
    from training.job import run

    losses = {}
    for flag in ("true", "false"):
        output_dir = os.path.join(output_root, f"fused_{flag}")
        run(load_config(config_path, [f"loss.fused_head={flag}", f"output_dir={output_dir}"]))
        with open(os.path.join(output_dir, "metrics.jsonl")) as lines:
            losses[flag] = {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}
    return losses


@pytest.fixture(scope="module")
def job_losses(tmp_path_factory, tokenizer_dir, tokenizer, demo_dir):
    from data.prepare import prepare
    from model_parallel.spawn import run_on_ranks

    root = tmp_path_factory.mktemp("fused_job")
    prepare(str(tokenizer_dir), [str(demo_dir / "sft/train.jsonl")], str(root / "train"), fmt="sft", seq_len=64)
    llama(REAL_VOCAB, hidden=32, layers=1).to_json_file(str(root / "student.json"))
    config = {"seed": 5, "tokenizer": str(tokenizer_dir),
              "teacher": {"path": save_model(llama(PADDED_VOCAB, hidden=48), root / "teacher", tokenizer)},
              "student": {"config": str(root / "student.json")}, "data": {"train": str(root / "train")},
              "loss": {"kind": "tail", "top_k": 5, "beta": 2.0},
              "train": {"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                        "min_lr": 3e-4, "dtype": "fp32"},
              "parallel": {"deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json"),
                           "student_zero_stage": 1},
              "checkpoint": {"every": 100}}
    losses = {}
    for tp, ranks in ((1, 1), (2, 2)):
        path = root / f"tp{tp}.yaml"
        path.write_text(yaml.safe_dump({**config, "parallel": {**config["parallel"], "tensor_parallel": tp}}))
        losses[tp] = run_on_ranks(ranks, _job_rank, str(path), str(root / f"tp{tp}"), deepspeed=True,
                                  timeout=600)[0]
    return losses


@pytest.mark.e2e
@pytest.mark.parametrize("tp", [1, 2])
def test_the_job_gives_the_same_losses_with_the_fused_head_on_and_off(job_losses, tp):
    """8 steps of SFT data (masked prompts) with a padded vocabulary, ZeRO-1, TP 1 and TP 2."""
    fused, unfused = job_losses[tp]["true"], job_losses[tp]["false"]
    assert sorted(fused) == sorted(unfused) == list(range(1, 9))
    for step in unfused:
        # fp32 rounding of the chunked head, carried through 8 steps of AdamW (see TOLERANCE).
        assert fused[step] == pytest.approx(unfused[step], rel=TOLERANCE), (tp, step)
