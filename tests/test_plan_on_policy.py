"""training.plan's on-policy terms (``on_policy.fraction`` λ > 0): the student's KV cache against the
bytes of a real transformers cache, generation's other memory terms and how they share the peak
with the training phase, ``generation_s`` against its definition, the decode op count against a
count of a real decode step, and ``launch.plan --json`` carrying them. An off-policy plan is
unchanged (tests/test_plan.py holds its terms and figures)."""

import copy
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from tests.tiny_models import gemma2, llama
from training.config import load_config
from training.plan import (GENERATION_TERMS, MEMORY_TERMS, ON_POLICY_ASSUMPTIONS, Cluster, Layout, decode_ops,
                           estimate, job_from_config, kv_cache_bytes, model_shape)
from training.plan.memory import SAMPLER_BYTES_PER_LOGIT, generation_forward_bytes, phase_overlap, student_partition
from training.plan.timing import SAMPLE_OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCTION = os.path.join(ROOT, "launch", "configs", "gemma2_9b_to_1b.yaml")
VOCAB, BATCH = 96, 3


def _cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers 5.23 ``DynamicCache`` holds (``cache.layers``)."""
    return sum(tensor.numel() * tensor.element_size()
               for layer in cache.layers for tensor in (layer.keys, layer.values))


def _rank_config(config, tp: int):
    """The model one of ``tp`` AutoTP ranks runs, as far as its cache goes: AutoTP splits q_proj,
    k_proj and v_proj by output columns, whole heads to a rank (the planner refuses a TP size that
    does not divide the heads), so a rank computes and caches the keys and values of kv_heads / tp
    heads, each of the same head_dim, in every layer with the same windows: the same model with
    heads and kv_heads divided by ``tp`` (head_dim pinned, which Llama would derive from them)."""
    config = copy.deepcopy(config)
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_attention_heads //= tp
    config.num_key_value_heads //= tp
    return config


def _real_cache(config, positions: int, dtype, *, step_by_step: bool = False):
    """The cache a no-grad forward with ``use_cache=True`` leaves over ``BATCH`` x ``positions`` tokens
    (the model makes it: ``DynamicCache(config=...)``); ``step_by_step``: a prefill of all but 4
    positions, then 4 one-token decode forwards, as generation fills it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(4, VOCAB, (BATCH, positions), generator=torch.Generator().manual_seed(1))  # (B, P + N)
    with torch.no_grad():
        if not step_by_step:
            return model(ids, use_cache=True).past_key_values
        cache = model(ids[:, :-4], use_cache=True).past_key_values
        for position in range(positions - 4, positions):
            cache = model(ids[:, position:position + 1], past_key_values=cache, use_cache=True).past_key_values
        return cache


@pytest.mark.parametrize("architecture, kwargs, tp, positions, dtype", [
    (llama, {}, 1, 24, torch.float32), (llama, {}, 2, 24, torch.bfloat16),
    # Gemma-2 alternates sliding-window (16) and full layers: 24 positions exceed the window, 10 do not.
    (gemma2, {}, 1, 24, torch.float32), (gemma2, {}, 2, 24, torch.bfloat16), (gemma2, {}, 1, 10, torch.bfloat16),
    # Grouped-query attention: 4 query heads over 2 key-value heads, one of each kind per rank at TP 2.
    (gemma2, {"heads": 4, "kv_heads": 2}, 2, 24, torch.float32),
])
def test_kv_cache_is_the_bytes_of_a_real_cache(tmp_path, architecture, kwargs, tp, positions, dtype):
    config = architecture(VOCAB, layers=4, **kwargs)
    config.to_json_file(tmp_path / "config.json")
    shape = model_shape(str(tmp_path / "config.json"), vocab=VOCAB, tp=tp)
    cache = _real_cache(_rank_config(config, tp), positions, dtype)
    w = torch.empty((), dtype=dtype).element_size()
    assert kv_cache_bytes(shape, BATCH, positions, tp, w) == _cache_bytes(cache)
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    if architecture is gemma2 and positions > config.sliding_window:
        # The sliding layers keep the last window - 1 positions: the term is not the full-cache bound.
        assert sorted(set(kept)) == [config.sliding_window - 1, positions], kept
    else:
        assert set(kept) == {positions}, kept


def test_a_cache_filled_token_by_token_holds_what_one_forward_leaves(tmp_path):
    """Generation fills the cache with a prefill and one-token decode steps; at P + N positions it
    holds what one forward over them leaves, sliding layers included (the term's reference)."""
    config = gemma2(VOCAB, layers=4)
    stepped = _real_cache(config, 24, torch.float32, step_by_step=True)
    assert _cache_bytes(stepped) == _cache_bytes(_real_cache(config, 24, torch.float32))


def _generate(model, prompt_ids, new: int):
    """The job's own generation (training.generation.generate) of ``new`` tokens, temperature 1, on
    one rank: the student's engine stood in for by its module at a stage that gathers nothing."""
    from training.generation import Sampling, generate

    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    rows = prompt_ids.shape[0]
    return generate(engine, prompt_ids, None, max_new_tokens=new, sampling=Sampling(temperature=1.0, seed=0, step=1),
                    sequence=torch.arange(rows, device=prompt_ids.device), vocab_start=0, real_vocab_size=VOCAB,
                    tp_group=None)


@pytest.mark.parametrize("architecture", [llama, gemma2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_memory_matches_a_counted_generation(tmp_path, architecture, dtype):
    """training.generation.generate (the prefill with logits_to_keep, decode steps, the vocabulary
    sampler), counted with LiveBytes over every tensor made inside (the weights, made before, are
    not): the most alive at once within 15% of the plan's cache and forward terms. The peak is the
    prefill's, its layer temporaries beside the cache (the plan's teacher_forward_bytes, held to 10%
    at real widths by tests/test_saved_bytes.py; here, at width 512, Gemma-2's is 12% above it)."""
    from transformers import AutoModelForCausalLM

    from model_parallel.testing.memory_counter import LiveBytes

    config = architecture(VOCAB, hidden=512, layers=2, **({"heads": 4, "kv_heads": 2, "sliding_window": 32}
                                                          if architecture is gemma2 else {}))
    config.to_json_file(tmp_path / "config.json")
    shape = model_shape(str(tmp_path / "config.json"), vocab=VOCAB, tp=1)
    assert shape.keeps_logits
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    prompt, new = 48, 4
    ids = torch.randint(4, VOCAB, (BATCH, prompt), generator=torch.Generator().manual_seed(2))  # (B, P)
    with LiveBytes() as counted:
        _generate(model, ids, new)
    w = torch.empty((), dtype=dtype).element_size()
    planned = kv_cache_bytes(shape, BATCH, prompt + new, 1, w) + \
        generation_forward_bytes(shape, BATCH, prompt, new, VOCAB, 1, w)
    assert planned == pytest.approx(counted.peak_bytes, rel=0.15), (config.model_type, counted.peak_bytes, planned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_samplers_temporaries_are_counted(dtype):
    """model_parallel.sample_tokens at temperature 1 on one rank's [B, V_local] logits holds at most
    SAMPLER_BYTES_PER_LOGIT bytes per logit at once, and no less than 90% of it (counted)."""
    from model_parallel import sample_tokens
    from model_parallel.testing.memory_counter import LiveBytes

    logits = torch.randn(4, 32768, dtype=dtype, generator=torch.Generator().manual_seed(4))  # (B, V_local)
    with LiveBytes() as counted:
        sample_tokens(logits, temperature=1.0, start=0, group=None, seed=1, step=2, sequence=torch.arange(4),
                      position=5)
    assert 0.9 * SAMPLER_BYTES_PER_LOGIT * logits.numel() <= counted.peak_bytes <= \
        SAMPLER_BYTES_PER_LOGIT * logits.numel() * 1.001, counted.peak_bytes


@pytest.mark.parametrize("architecture", [llama, gemma2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ops_are_held_to_a_count_of_the_jobs_generation(tmp_path, architecture, dtype):
    """decode_ops + SAMPLE_OPS (the host's launches per generated token, an estimate) within 20% of
    the ops training.generation.generate dispatches per token on CPU (6 new tokens less 2: the
    prefill and the loop's set-up cancel), views left out (they launch no kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            aliasing = any(result.alias_info is not None for result in func._schema.returns)
            if not aliasing and func is not torch.ops.aten._unsafe_view.default:
                Ops.count += 1
            return func(*args, **(kwargs or {}))

    config = architecture(VOCAB, layers=6)
    config.to_json_file(tmp_path / "config.json")
    shape = model_shape(str(tmp_path / "config.json"), vocab=VOCAB, tp=1)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(4, VOCAB, (BATCH, 12), generator=torch.Generator().manual_seed(3))  # (B, P)
    counts = []
    for new in (2, 6):
        Ops.count = 0
        with Ops():
            _generate(model, ids, new)
        counts.append(Ops.count)
    per_token = (counts[1] - counts[0]) / 4
    planned = decode_ops(shape, torch.empty((), dtype=dtype).element_size()) + SAMPLE_OPS
    assert 0.8 * per_token <= planned <= 1.2 * per_token, (config.model_type, dtype, per_token, planned)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Manifests of prepared data of each format (the planner reads only ``format`` and ``seq_len``)."""
    where = {}
    for fmt in ("text", "sft"):
        path = tmp_path_factory.mktemp(fmt)
        (path / "manifest.json").write_text(json.dumps({"format": fmt, "seq_len": 512}))
        where[fmt] = str(path)
    return where


def _job(*overrides, tp=4):
    return job_from_config(load_config(PRODUCTION, list(overrides)), world_size=16, tp=tp, bf16=True)


def test_the_prompt_is_the_configs_for_text_and_the_bound_for_sft(prepared):
    text = _job(f"data.train={prepared['text']}", "on_policy.fraction=0.5", "on_policy.prompt_tokens=100",
                "on_policy.max_new_tokens=50").generation
    assert (text.fraction, text.prompt_tokens, text.new_tokens, text.prompt_source) == (0.5, 100, 50, "text")
    sft = _job(f"data.train={prepared['sft']}", "on_policy.fraction=1", "on_policy.max_new_tokens=50").generation
    assert (sft.prompt_tokens, sft.prompt_source) == (512 - 50, "sft")
    # Not prepared yet: the format it will be prepared in (data.format; data.seq_len 2048).
    unprepared = _job("on_policy.fraction=1", "on_policy.max_new_tokens=48").generation
    assert (unprepared.prompt_tokens, unprepared.prompt_source) == (32, "text")
    unprepared_sft = _job("on_policy.fraction=1", "on_policy.max_new_tokens=48", "data.format=sft").generation
    assert (unprepared_sft.prompt_tokens, unprepared_sft.prompt_source) == (2048 - 48, "sft")
    assert _job(f"data.train={prepared['text']}").generation is None


@pytest.mark.parametrize("overrides, message", [
    (["on_policy.prompt_tokens=500", "on_policy.max_new_tokens=13"],
     "on_policy.prompt_tokens: 500 + on_policy.max_new_tokens 13 exceed the data's 512-token blocks"),
    (["on_policy.max_new_tokens=512"], "on_policy.max_new_tokens: 512 leaves no room for a prompt"),
])
def test_a_continuation_that_does_not_fit_is_refused_by_name(prepared, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _job(f"data.train={prepared['text']}", "on_policy.fraction=1", *overrides)


def test_generation_memory_terms_and_the_peak(prepared):
    """kv_cache is one micro-batch's cache at P + N; ZeRO-3's gathered shard completes the rank's
    partition to the whole shard (0 at stages 1-2); the peak holds the larger phase's transients,
    so where training's are larger the on-policy peak is the off-policy one."""
    cluster = Cluster()
    off = _job(f"data.train={prepared['text']}")
    on = _job(f"data.train={prepared['text']}", "on_policy.fraction=1", "on_policy.prompt_tokens=64",
              "on_policy.max_new_tokens=64")
    for stage in (1, 2, 3):
        layout = Layout(4, "resident", stage, 8, 2, False)
        before, after = estimate(off, layout, cluster), estimate(on, layout, cluster)
        assert tuple(before.memory) == tuple(t for t in MEMORY_TERMS if t not in GENERATION_TERMS)
        assert tuple(after.memory) == MEMORY_TERMS and before.overlap == 0
        assert {t: after.memory[t] for t in before.memory} == before.memory
        assert after.memory["kv_cache"] == kv_cache_bytes(on.student, 8, 128, 4, 2) > 0
        shard = 2 * on.student.per_rank(4)
        if stage == 3:
            assert after.memory["student_weights"] + after.memory["generation_weights"] == pytest.approx(shard)
        else:
            assert after.memory["generation_weights"] == 0 and after.memory["student_weights"] == shard
        generating = sum(after.memory[t] for t in GENERATION_TERMS)
        assert generating < after.memory["activations"]  # 128-token prompts against 512-token training rows
        assert after.peak_memory_bytes == pytest.approx(before.peak_memory_bytes, rel=1e-12)


def test_the_peak_holds_both_phases_shared_bytes_and_the_larger_phase(prepared):
    """Generation's terms and the training phase's transients (activations, logits and, under
    ZeRO-3, the student's parameters gathered for the forwards: below stage3_max_live_parameters
    the shard less the rank's partition) take turns: the peak is everything else plus the larger of
    the two phases, whichever it is (the cache set smaller, then larger, than training's)."""
    on = _job(f"data.train={prepared['text']}", "on_policy.fraction=1")
    cluster = Cluster()
    for stage in (1, 3):
        layout = Layout(4, "resident", stage, 8, 2, False)
        planned = estimate(on, layout, cluster).memory
        gathered = 2 * (on.student.per_rank(4) - student_partition(on, layout, cluster)) if stage == 3 else 0.0
        assert on.student.per_rank(4) < on.ds["stage3_max_live_parameters"]
        training = planned["activations"] + planned["logits"] + gathered
        for kv_cache in (0.0, 2 * training):
            memory = {**planned, "kv_cache": kv_cache}
            generating = sum(memory[t] for t in GENERATION_TERMS)
            shared = sum(memory.values()) - training - generating
            peak = sum(memory.values()) - phase_overlap(on, layout, cluster, memory)
            assert peak == pytest.approx(shared + max(training, generating), rel=1e-12), (stage, kv_cache)


def _generation_s(job, layout=Layout(4, "resident", 1, 8, 2, False), cluster=Cluster()):
    result = estimate(job, layout, cluster)
    return result.seconds.get("generation"), result


def test_generation_seconds_are_expected_over_the_fraction(prepared):
    data = f"data.train={prepared['text']}"
    absent, off = _generation_s(_job(data))
    assert absent is None and "generation" not in off.seconds
    zero, _ = _generation_s(_job(data, "on_policy.fraction=0"))
    assert zero is None
    half, at_half = _generation_s(_job(data, "on_policy.fraction=0.5"))
    full, at_full = _generation_s(_job(data, "on_policy.fraction=1"))
    assert half > 0 and full == pytest.approx(2 * half, rel=1e-12)
    # It is part of the step, and the only part that changes.
    assert at_full.step_time_s - off.step_time_s == pytest.approx(full, rel=1e-9)
    assert {k: v for k, v in at_full.seconds.items() if k != "generation"} == off.seconds
    longer = [_generation_s(_job(data, "on_policy.fraction=1", f"on_policy.max_new_tokens={n}"))[0]
              for n in (16, 64, 256)]
    assert longer[0] < longer[1] < longer[2]


def test_a_decode_step_reads_every_weight_and_the_cache(prepared):
    """With a slow memory (1 GB/s) decoding is bound by its reads: per generating step, grad_accum
    calls of N steps, each reading the student's weights and the whole cache (TP 1: no all-reduces;
    the prefill's compute is 1e-5 of it)."""
    job = _job(f"data.train={prepared['text']}", "on_policy.fraction=1", "on_policy.prompt_tokens=32",
               "on_policy.max_new_tokens=64", tp=1)
    layout = Layout(1, "resident", 1, 2, 2, False)
    seconds, _ = _generation_s(job, layout, Cluster(hbm_gbps=1.0))
    read = 2 * job.student.matmul_params() + kv_cache_bytes(job.student, 2, 32 + 64, 1, 2)
    assert seconds == pytest.approx(2 * 64 * read / 1e9, rel=1e-4)


def test_launch_plan_json_and_report_carry_the_generation(capsys):
    """``launch.plan`` in-process on the shipped config, on-policy and off: the JSON's memory terms,
    ``generation_s`` and the peak less the phases' overlap; the report's lines."""
    from launch.plan import main

    args = ["--config", PRODUCTION, "--nodes", "1", "--as-configured", "--set", "parallel.tensor_parallel=8",
            "--set", "train.grad_accum=4"]
    main([*args, "--set", "on_policy.fraction=1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(GENERATION_TERMS) <= set(out["memory"]) and out["memory"]["kv_cache"] > 0
    assert out["generation_s"] == out["seconds"]["generation"] > 0
    assert out["step_time_s"] == pytest.approx(sum(out["seconds"].values()))
    assert out["peak_memory_bytes"] == pytest.approx(sum(out["memory"].values()) - out["phase_overlap_bytes"])
    assert out["generation"]["prompt_source"] == "text" and out["cluster"]["hbm_gbps"] == 3350
    assert set(ON_POLICY_ASSUMPTIONS) <= set(out["assumptions"])
    main([*args, "--set", "on_policy.fraction=1", "--hbm-gbps", "4800"])
    report = capsys.readouterr().out
    assert "kv_cache" in report and "generation_forward" in report and "on-policy: fraction 1" in report
    assert "generation " in report.split("step time:")[1] and "4800 GB/s" in report
    main([*args, "--json"])
    off = json.loads(capsys.readouterr().out)
    assert off["generation_s"] == 0 and off["generation"] is None and off["phase_overlap_bytes"] == 0
    assert not set(GENERATION_TERMS) & set(off["memory"]) and "generation" not in off["seconds"]
    assert not set(ON_POLICY_ASSUMPTIONS) & set(off["assumptions"])
    main(args)
    assert "kv_cache" not in capsys.readouterr().out
