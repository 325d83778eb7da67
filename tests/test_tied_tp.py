"""A tied Qwen2 (its head *is* its plain embedding) at tensor_parallel 2 trains as at tensor_parallel 1.

At TP > 1 AutoTP makes the head a ``VocabParallelLinear`` and the tied embedding a
``VocabParallelEmbedding`` over the same Parameter (DeepSpeed's ``module_inject/layers.py``), so the
embedding's and the head's gradients meet in one accumulator, and ZeRO sees one weight used by two
modules. On 2 gloo ranks, one launch builds the job's engines (``training.engines.build_engines``,
tied Qwen2 teacher and student) three times: TP 1 with ZeRO-1 (data parallel 2: the reference),
then TP 2 with the student at ZeRO-1 and at ZeRO-3 (TP 1 first: DeepSpeed keeps the first
tensor-parallel groups it makes for the process). Each takes the same optimizer steps of the job's
own ``training.step.train_step`` on the same global batches. One launch: ~15 s on an idle 2-core
machine, 50-60 s shared.
"""

import os

import pytest
import torch
import yaml

from model_parallel.spawn import run_on_ranks
from tests.tiny_models import qwen2, save_model

pytestmark = pytest.mark.e2e  # trains on spawned DeepSpeed ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512
BATCH, SEQ = 4, 16
# The job's schedule (DeepSpeed's WarmupCosineLR warms up linearly from 0 over at least 2 steps)
# gives the first two steps lr 0: they only fill Adam's moments; the third (lr 5e-4) moves the weights.
STEPS = 3
# 2 ranks: TP 2 has data parallel 1, so ZeRO splits nothing across ranks there. WORLD = 4 (TP 2 x DP 2,
# where ZeRO-3 partitions the tied weight over 2 ranks) passes as well: 45-55 s here.
WORLD = 2
# (name, tensor_parallel, student ZeRO stage, loss.fused_head): the unfused path at TP 1 is the reference;
# TP 2 runs it unfused (AutoTP's tied vocabulary-parallel head as is) and fused (loss.fused on the shared slice).
LAYOUTS = (("tp1", 1, 1, False), ("tp2_zero1", 2, 1, False), ("tp2_zero3", 2, 3, True))


def _tied_qwen2(hidden):
    config = qwen2(VOCAB, hidden=hidden)
    config.num_key_value_heads = 2  # AutoTP splits the key-value heads: one per rank at TP 2
    return config


def _optimizer_params(optimizer) -> list:
    """The model parameters the ZeRO optimizer updates (stage 1/2: ``bit16_groups``; 3: ``fp16_groups``)."""
    groups = getattr(optimizer, "bit16_groups", None) or optimizer.fp16_groups
    return [param for group in groups for param in group]


def _gathered(model) -> dict:
    """Each parameter by name, this rank's tensor-parallel shard whole (gathered where ZeRO-3 partitions it)."""
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().to("cpu", copy=True)
    return out


def _layout(rank, world_size, config_path, tp, stage, fused, ids, batches):
    from deepspeed.utils import safe_get_full_grad

    from training.checkpoint import head_record
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.models import tied_head
    from training.step import step_means, train_step

    dp = world_size // tp
    cfg = load_config(config_path, [f"parallel.tensor_parallel={tp}", f"parallel.student_zero_stage={stage}",
                                    f"train.micro_batch_size={BATCH // dp}", f"loss.fused_head={str(fused).lower()}"])
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, False),
                            bf16=False)
    student, model = engines.student, engines.student.module
    out = {"start": engines.vocab_start, "tp_rank": rank % tp, "fused": engines.fused is not None}  # DeepSpeed's mesh: (data, tensor) parallel
    with torch.no_grad():
        out["logits"] = {name: engine(input_ids=ids, use_cache=False).logits
                         for name, engine in (("student", student), ("teacher", engines.teacher))}
    grads, step = {}, student.step

    def capturing_step(*args, **kwargs):  # the reduced gradients, before the optimizer consumes them
        grads.update({name: safe_get_full_grad(param).detach().clone() for name, param in model.named_parameters()})
        return step(*args, **kwargs)

    student.step = capturing_step
    out["steps"] = []
    for batch in batches:  # each data-parallel rank takes its own rows of the global batch
        rows = batch.view(dp, -1, batch.shape[1])[rank // tp]
        result = train_step(engines, cfg.loss, [{"input_ids": rows, "labels": rows.clone()}])
        out["steps"].append({"grads": dict(grads), **step_means(result, engines)})
    with torch.no_grad():
        out["logits_after"] = student(input_ids=ids, use_cache=False).logits
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    params = _optimizer_params(student.optimizer)
    out.update(weights=_gathered(model),
               tied=tied_head(model) and embedding.weight is head.weight, record=head_record(model),
               classes=(type(embedding).__name__, type(head).__name__),
               optimized=len(params), unique=len({id(param) for param in params}),
               model_params=len(list(model.parameters())))
    return out


def _rank(rank, world_size, config_path, student_dir, teacher_dir):
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    ids, *batches = (torch.randint(4, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(1 + STEPS))
    models = {name: AutoModelForCausalLM.from_pretrained(path) for name, path in (("student", student_dir),
                                                                                   ("teacher", teacher_dir))}
    with torch.no_grad():
        out = {"one_device": {name: model(input_ids=ids).logits for name, model in models.items()},
               "initial": {name: param.detach().clone() for name, param in models["student"].named_parameters()}}
    for name, tp, stage, fused in LAYOUTS:
        out[name] = _layout(rank, world_size, config_path, tp, stage, fused, ids, batches)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, tokenizer):
    root = tmp_path_factory.mktemp("tied_tp")
    student = save_model(_tied_qwen2(32), root / "student", tokenizer, seed=1)
    teacher = save_model(_tied_qwen2(48), root / "teacher", tokenizer, seed=2)
    config = {"output_dir": str(root / "run"), "seed": 5, "tokenizer": str(tokenizer_dir),
              "teacher": {"path": teacher}, "student": {"path": student}, "data": {"train": str(root / "unused")},
              "loss": {"kind": "tail", "top_k": 5, "beta": 2.0},
              "train": {"max_steps": 100, "micro_batch_size": BATCH, "grad_accum": 1, "warmup_steps": 1, "lr": 1e-3,
                        "dtype": "fp32"},
              "parallel": {"deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json")}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_on_ranks(WORLD, _rank, str(path), student, teacher, deepspeed=True, timeout=300)


def _shard(full, shard, tp_rank):
    """The part of ``full`` (a TP 1 tensor) that ``shard`` (a TP 2 one) holds: AutoTP splits one
    dimension evenly (rows of the column-parallel and vocabulary-parallel layers, columns of the
    row-parallel ones) and replicates the rest."""
    dims = [dim for dim in range(full.dim()) if full.shape[dim] != shard.shape[dim]]
    return full if not dims else full.chunk(full.shape[dims[0]] // shard.shape[dims[0]], dims[0])[tp_rank]


def _tp2_layouts(runs):
    """(rank's TP 1 result, its TP 2 result, the TP 2 layout's name) for every rank and TP 2 layout."""
    return [(run["tp1"], run[name], name) for run in runs for name, tp, _, _ in LAYOUTS if tp == 2]


def test_autotp_shares_the_plain_embedding_with_the_vocabulary_parallel_head(runs):
    """One Parameter, before and after the steps: the embedding is AutoTP's vocabulary-parallel copy
    of the head's slice, the optimizer updates it once, and the checkpoint records the head as tied."""
    for run in runs:
        for name, tp, _, fused in LAYOUTS:
            out = run[name]
            assert out["fused"] == fused, name  # the path the layout names was the one taken
            assert out["tied"], name  # embedding.weight *is* head.weight
            assert out["classes"] == (("Embedding", "Linear") if tp == 1 else
                                      ("VocabParallelEmbedding", "VocabParallelLinear")), name
            assert out["optimized"] == out["unique"] == out["model_params"], name  # the shared weight once
            assert "lm_head.weight" not in out["weights"], name
            assert out["weights"]["model.embed_tokens.weight"].shape == (VOCAB // tp, 32), name
            assert out["record"] == {"tied": True, "head": "lm_head.weight", "embedding": "model.embed_tokens.weight",
                                     "scaled_embedding": False}, name


def test_each_ranks_logits_are_its_slice_of_one_devices(runs):
    """Teacher and student, before training; the two ranks' slices cover the vocabulary."""
    for reference, out, name in _tp2_layouts(runs):
        for model in ("student", "teacher"):
            logits = out["logits"][model]  # (B, S, V/2)
            expected = runs[0]["one_device"][model][..., out["start"]:out["start"] + logits.shape[-1]]
            # fp32; row-parallel layers (and the embedding's all-reduce) add partial sums in another order.
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6, msg=f"{name} {model}")
    assert {run["tp2_zero3"]["start"] for run in runs} == {0, VOCAB // 2}


def test_each_steps_loss_and_gradients_match_tensor_parallel_1(runs):
    """fp32. Measured: losses within 2.9e-6 relative (a KL of two nearly equal random models, 0.032,
    where the sums' reordering does not cancel), gradient norms within 1e-7, every gradient within
    6.3e-6 of its tensor's largest entry. Tolerances ~5x that. The tied weight's gradient is the
    head's plus the embedding's: with the embedding's part dropped at TP 2 (a trial run detaching
    its output) the first step's gradient norm fell from 0.0240 to 0.0204 and this test failed."""
    for reference, out, name in _tp2_layouts(runs):
        assert len(out["steps"]) == len(reference["steps"]) == STEPS
        for step, (got, want) in enumerate(zip(out["steps"], reference["steps"])):
            assert got["loss"] == pytest.approx(want["loss"], rel=1.5e-5), (name, step)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), (name, step)
            assert got["grads"].keys() == want["grads"].keys()
            for tensor, grad in got["grads"].items():
                full = want["grads"][tensor]
                expected = _shard(full, grad, out["tp_rank"])
                torch.testing.assert_close(grad, expected, rtol=0, atol=3e-5 * float(full.abs().max()),
                                           msg=f"{name} step {step + 1} {tensor}")


def test_updated_weights_and_logits_match_tensor_parallel_1(runs):
    """After the steps (the third moves every weight by up to its lr, 5e-4): each rank's gathered
    shard equals TP 1's within 1e-6 (measured 6e-8, an fp32 ulp of the norms' weights near 1), and the
    logits of the updated models (the head and the embedding read the one updated tensor) agree."""
    initial = runs[0]["initial"]["model.embed_tokens.weight"]
    moved = runs[0]["tp1"]["weights"]["model.embed_tokens.weight"] - initial
    assert float(moved.abs().max()) > 2.5e-4  # the steps did update the tied weight
    for reference, out, name in _tp2_layouts(runs):
        assert out["weights"].keys() == reference["weights"].keys()
        for tensor, weight in out["weights"].items():
            expected = _shard(reference["weights"][tensor], weight, out["tp_rank"])
            torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=f"{name} {tensor}")
        logits = out["logits_after"]
        expected = reference["logits_after"][..., out["start"]:out["start"] + logits.shape[-1]]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6, msg=name)
