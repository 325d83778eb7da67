"""On-policy distillation in one process (no DeepSpeed): generation against transformers' own
``generate``, the scored rows against a row-by-row reference, the step's loss on a generated batch
against float64 references (and TRL's GKD loss, as a client), the λ draw and the refusals.

The sampler's own tests (goodness of fit, layout independence) are in ``test_sampling.py``; the
job on 1 and 2 ranks, ZeRO-3 generation and λ = 0 against today's run in ``test_on_policy_job.py``.
"""

from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from tests.reference import reference_divergence, reference_kl
from tests.tiny_models import gemma2, llama
from training.config import LossConfig, OnPolicyConfig, RunConfig
from training.generation import Sampling, generate
from training.on_policy import check_data, is_on_policy, prompts, scored_micro_batch
from training.step import _unfused_micro_batch

VOCAB, EOS, PAD = 64, 3, 0


def _model(architecture, seed, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(architecture(VOCAB, **kwargs)).eval()


def _engine(model):
    """What :func:`training.generation.generate` reads of a DeepSpeed engine, for a plain model."""
    return SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)


def _left_padded(rows):
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("architecture", [llama, gemma2])  # Gemma-2: soft-caps, sliding window (8 < 5 + 12)
@pytest.mark.parametrize("padded", [False, True])  # text blocks' equal prompts; SFT prompts of several lengths
def test_greedy_generation_equals_transformers_generate(architecture, padded):
    kwargs = {"sliding_window": 8} if architecture is gemma2 else {}
    model = _model(architecture, seed=0, **kwargs)
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 3, 5, 1] if padded else [5] * 4
    ids, mask = _left_padded([torch.randint(4, VOCAB, (n,), generator=generator).tolist() for n in lengths])
    mask = mask if padded else None
    ours = generate(_engine(model), ids, mask, max_new_tokens=12, sampling=Sampling(temperature=0.0, seed=0, step=0),
                    sequence=torch.arange(4), vocab_start=0, real_vocab_size=VOCAB, tp_group=None)
    # transformers' greedy search on the full vocabulary, never stopping at EOS (neither do we).
    theirs = model.generate(ids, attention_mask=mask if padded else torch.ones_like(ids), max_new_tokens=12,
                            min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(ours, theirs[:, ids.shape[1]:])
    assert not model.training or pytest.fail("generate leaves the model in the mode it found it in")


def test_generation_returns_the_model_to_training_mode_and_never_samples_padding():
    model = _model(llama, seed=0).train()
    ids = torch.randint(4, VOCAB, (64, 4), generator=torch.Generator().manual_seed(2))
    real = VOCAB - 8  # the last 8 head rows are vocabulary padding
    tokens = generate(_engine(model), ids, None, max_new_tokens=6, sampling=Sampling(temperature=5.0, seed=1, step=3),
                      sequence=torch.arange(64), vocab_start=0, real_vocab_size=real, tp_group=None)
    assert model.training
    assert tokens.shape == (64, 6) and int(tokens.max()) < real
    again = generate(_engine(model), ids, None, max_new_tokens=6, sampling=Sampling(temperature=5.0, seed=1, step=3),
                     sequence=torch.arange(64), vocab_start=0, real_vocab_size=real, tp_group=None)
    assert torch.equal(tokens, again)  # counter-based noise: no state
    other = generate(_engine(model), ids, None, max_new_tokens=6, sampling=Sampling(temperature=5.0, seed=1, step=4),
                     sequence=torch.arange(64), vocab_start=0, real_vocab_size=real, tp_group=None)
    assert not torch.equal(tokens, other)


def _reference_rows(prompt_rows, continuation, loss_on_prompt):
    """Row by row: the scored ids, and (row, position, target, weight) of every loss token."""
    rows, new = continuation.shape
    width = max(len(p) for p in prompt_rows) + new
    ids, tokens = torch.full((rows, width), PAD, dtype=torch.long), []
    for i, prompt in enumerate(prompt_rows):
        row = list(prompt) + continuation[i].tolist()
        ids[i, :len(row)] = torch.tensor(row)
        alive = True
        for t in range(1, len(row)):  # position t-1 predicts token t
            in_prompt = t < len(prompt)
            if in_prompt and not loss_on_prompt:
                continue
            tokens.append((i, t - 1, row[t], 1.0 if (in_prompt or alive) else 0.0))
            if not in_prompt and row[t] == EOS:
                alive = False
    return ids, tokens


@pytest.mark.parametrize("loss_on_prompt", [False, True])
def test_scored_rows_match_a_row_by_row_reference(loss_on_prompt):
    prompt_rows = [[5, 6, 7], [8], [9, 10]]
    continuation = torch.tensor([[11, EOS, 12, 13], [14, 15, 16, 17], [EOS, 18, EOS, 19]])
    ids, mask = _left_padded(prompt_rows)
    prompt = SimpleNamespace(ids=ids, mask=mask, lengths=[len(p) for p in prompt_rows])
    scored = scored_micro_batch(prompt, continuation, eos_token_id=EOS, pad_token_id=PAD,
                                loss_on_prompt=loss_on_prompt)
    want_ids, tokens = _reference_rows(prompt_rows, continuation, loss_on_prompt)
    assert torch.equal(scored.input_ids, want_ids)
    where = scored.positions
    positions = where.keep[torch.arange(len(where.keep)).repeat(3)]
    flat = positions if where.select is None else positions[where.select]
    rows = where.rows % 3
    got = sorted(zip(rows.tolist(), flat.tolist(), where.targets.tolist(), where.weights.tolist()))
    assert got == sorted(tokens)
    assert torch.equal(where.rows >= 3, where.weights == 0)  # weightless tokens sit in sequences of their own
    assert where.num_sequences == 6


def _generated_batch(student, loss_on_prompt=False):
    """A batch the student wrote: two SFT-like prompts of different lengths, 10 sampled tokens each."""
    ids, mask = _left_padded([[5, 6, 7, 8], [9, 10]])
    tokens = generate(_engine(student), ids, mask, max_new_tokens=10, sampling=Sampling(temperature=1.5, seed=0, step=0),
                      sequence=torch.arange(2), vocab_start=0, real_vocab_size=VOCAB, tp_group=None)
    tokens[0, 4] = EOS  # one row stops early: its last 5 tokens weigh 0
    tokens[1] = torch.where(tokens[1] == EOS, EOS + 1, tokens[1])  # the other writes all 10
    prompt = SimpleNamespace(ids=ids, mask=mask, lengths=[4, 2])
    scored = scored_micro_batch(prompt, tokens, eos_token_id=EOS, pad_token_id=PAD, loss_on_prompt=loss_on_prompt)
    return scored, tokens


def _full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[:, :-1]  # (B, L-1, V): position t predicts token t+1


@pytest.mark.parametrize("kind", ["kl", "tail"])
@pytest.mark.parametrize("beta_mode", ["constant", "sequence"])
def test_the_step_loss_on_a_generated_batch_equals_a_float64_reference(kind, beta_mode):
    student, teacher = _model(llama, seed=0), _model(llama, seed=1, hidden=48)
    scored, continuation = _generated_batch(student)
    engines = SimpleNamespace(student=student, teacher=teacher, vocab_start=0, real_vocab_size=VOCAB,
                              device=torch.device("cpu"), tp_group=None, vocab_shard=None)
    loss_cfg = LossConfig(kind=kind, top_k=5, beta=1.0, beta_mode=beta_mode)
    total, out, _ = _unfused_micro_batch(engines, loss_cfg, {"input_ids": scored.input_ids}, scored.positions)
    # Reference: every (row, position) the reference layout counts, from full logits, in float64.
    _, tokens = _reference_rows([[5, 6, 7, 8], [9, 10]], continuation, False)
    s_all, t_all = _full_logits(student, scored.input_ids), _full_logits(teacher, scored.input_ids)
    counted = [(i, t) for i, t, _, w in tokens if w == 1.0]
    s = torch.stack([s_all[i, t] for i, t in counted])
    t = torch.stack([t_all[i, t] for i, t in counted])
    if kind == "kl":
        per_token = reference_kl(s, t)
    elif beta_mode == "constant":
        per_token = reference_divergence(s, t, top_k=5, beta=1.0)
    else:  # β_t = β · P_tail,t / mean P_tail over the *counted* tokens of t's row
        from tests.reference import reference_parts

        _, _, p_tail, _ = reference_parts(s, t, top_k=5)
        rows = torch.tensor([i for i, _ in counted])
        means = torch.stack([p_tail[rows == i].mean() for i in range(2)])[rows]
        per_token = reference_divergence(s, t, top_k=5, beta=p_tail / means)
    assert len(counted) == 5 + 10  # row 0: 5 tokens up to and including its EOS (0 after), row 1: all 10
    torch.testing.assert_close(total.double(), per_token.sum(), rtol=1e-5, atol=1e-6)
    weighted_kd = (out["kd"] * scored.positions.weights).sum()
    torch.testing.assert_close(weighted_kd.double(), per_token.sum(), rtol=1e-5, atol=1e-6)


def test_trl_gkd_forward_kl_gives_the_jobs_kl_values():
    """TRL's ``generalized_jsd_loss`` at β = 0 (KL(teacher‖student)) on the same logits and labels."""
    from trl.experimental.gkd import GKDTrainer

    student, teacher = _model(llama, seed=0), _model(llama, seed=1, hidden=48)
    scored, _ = _generated_batch(student)
    engines = SimpleNamespace(student=student, teacher=teacher, vocab_start=0, real_vocab_size=VOCAB,
                              device=torch.device("cpu"), tp_group=None, vocab_shard=None)
    for temperature in (1.0, 2.0):
        loss_cfg = LossConfig(kind="kl", temperature=temperature)
        with torch.no_grad():
            _, out, _ = _unfused_micro_batch(engines, loss_cfg, {"input_ids": scored.input_ids}, scored.positions)
        where = scored.positions
        ours = (out["kd"] * where.weights).sum() / where.weights.sum()
        # TRL's labels: the scored rows' next tokens where the job counts them, -100 elsewhere.
        labels = torch.full(scored.input_ids[:, 1:].shape, -100, dtype=torch.long)
        positions = where.keep[torch.arange(len(where.keep)).repeat(2)]
        flat = positions if where.select is None else positions[where.select]
        rows, counted = where.rows % 2, where.weights > 0
        labels[rows[counted], flat[counted]] = where.targets[counted]
        theirs = GKDTrainer.generalized_jsd_loss(_full_logits(student, scored.input_ids),
                                                 _full_logits(teacher, scored.input_ids), labels=labels, beta=0.0,
                                                 temperature=temperature, reduction="batchmean")
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_the_on_policy_draw_is_a_function_of_seed_and_step():
    assert not any(is_on_policy(0, step, 0.0) for step in range(1, 500))
    assert all(is_on_policy(0, step, 1.0) for step in range(1, 500))
    draws = [is_on_policy(7, step, 0.3) for step in range(1, 4001)]
    assert draws == [is_on_policy(7, step, 0.3) for step in range(1, 4001)]
    # 4000 Bernoulli(0.3): sd 0.0072; 5 sd either side.
    assert abs(sum(draws) / len(draws) - 0.3) < 0.036
    assert draws != [is_on_policy(8, step, 0.3) for step in range(1, 4001)]


def test_prompts_of_text_blocks_and_sft_rows():
    on_policy = OnPolicyConfig(fraction=1.0, prompt_tokens=3, max_new_tokens=4)
    block = {"input_ids": torch.arange(10, 20).view(1, 10), "labels": torch.arange(10, 20).view(1, 10)}
    got = prompts(block, on_policy, sft=False, seq_len=10, pad_token_id=PAD)
    assert got.ids.tolist() == [[10, 11, 12]] and got.mask is None and got.lengths == [3]
    ids = torch.tensor([[20, 21, 22, 23, 24, 25, 26, 27], [30, 31, 32, 33, PAD, PAD, PAD, PAD]])
    labels = torch.tensor([[-100] * 7 + [27], [-100, -100, 32, 33, -100, -100, -100, -100]])
    got = prompts({"input_ids": ids, "labels": labels}, on_policy, sft=True, seq_len=8, pad_token_id=PAD)
    # Row 0's prompt (7 tokens) keeps its last 8 - 4 = 4; row 1's is 2 tokens, left-padded.
    assert got.ids.tolist() == [[23, 24, 25, 26], [PAD, PAD, 30, 31]]
    assert got.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]] and got.lengths == [4, 2]
    with pytest.raises(ConfigError, match="has no prompt"):
        prompts({"input_ids": ids, "labels": ids}, on_policy, sft=True, seq_len=8, pad_token_id=PAD)


def _run_config(**on_policy):
    return dict(student={"config": "x.json"}, teacher={"path": "t"}, data={"train": "d"}, on_policy=on_policy)


def test_refusals_name_the_key():
    from training.config import _build

    def build(**sections):
        return _build(RunConfig, sections, "")

    with pytest.raises(ConfigError, match="on_policy.fraction: must be in"):
        build(**_run_config(fraction=1.5))
    with pytest.raises(ConfigError, match="on_policy.temperature"):
        build(**_run_config(temperature=-1))
    with pytest.raises(ConfigError, match="on_policy.max_new_tokens"):
        build(**_run_config(max_new_tokens=0))
    with pytest.raises(ConfigError, match="loss.kind 'ce'"):
        build(**_run_config(fraction=0.5), loss={"kind": "ce"})
    with pytest.raises(ConfigError, match="loss.ce_weight"):
        build(**_run_config(fraction=0.5), loss={"kind": "kl", "ce_weight": 0.1})
    build(**_run_config(fraction=0.0), loss={"kind": "ce"})  # off-policy ce is today's
    with pytest.raises(ConfigError, match="packed"):
        check_data(OnPolicyConfig(fraction=0.5), {"format": "sft", "packed": True, "seq_len": 64})
    with pytest.raises(ConfigError, match="prompt_tokens \\+ on_policy.max_new_tokens"):
        check_data(OnPolicyConfig(fraction=0.5, prompt_tokens=32, max_new_tokens=64), {"format": "text", "seq_len": 64})
    check_data(OnPolicyConfig(fraction=0.0, prompt_tokens=32, max_new_tokens=64), {"format": "text", "seq_len": 64})


@pytest.mark.parametrize("kind", ["kl", "tail"])
def test_fused_objective_weighs_tokens_as_the_unfused_step_does(kind):
    """On-policy weights in the fused head (``token_weights``): total and gradients equal the unfused
    objective's weighted sum, in float64 (so the chunked sum is compared at float64 rounding)."""
    from loss.fused import OutputLayer, fused_objective
    from loss.objective import distillation_objective
    from model_parallel import VocabShard

    g = torch.Generator().manual_seed(3)
    tokens, hidden_size = 300, 16
    hidden = torch.randn(tokens, hidden_size, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(tokens, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, hidden_size, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(VOCAB, hidden_size, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (tokens,), generator=g)
    weights = (torch.rand(tokens, generator=g) > 0.3).double()
    settings = dict(kind=kind, top_k=5, beta=1.0)

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = distillation_objective(h1 @ w1.T, teacher_hidden @ teacher_weight.T, targets, **settings)
    reference = (out["loss"] * weights).sum()
    reference.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    total, _ = fused_objective(h2, OutputLayer(w2), teacher_hidden, OutputLayer(teacher_weight), targets,
                               shard=VocabShard(0, VOCAB, VOCAB), token_weights=weights, **settings)
    total.backward()
    torch.testing.assert_close(total, reference, rtol=1e-10, atol=1e-12)
    # The fused head accumulates its gradients in fp32 buffers (by design): fp32 rounding.
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(h2.grad[weights == 0], torch.zeros_like(h2.grad[weights == 0]))  # weightless rows: no gradient
    assert h2.grad[weights == 1].abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_makes_no_host_sync_per_token(temperature):
    """Counted on CPU (``tests/test_host_syncs.SyncCounter``): no sync of ours at all, and none of
    transformers' that grows with the number of new tokens (no early-exit check per token)."""
    from tests.test_host_syncs import SyncCounter

    model = _model(llama, seed=0)
    ids = torch.randint(4, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))

    def counted(new_tokens):
        with SyncCounter() as counter:
            generate(_engine(model), ids.clone(), None, max_new_tokens=new_tokens,
                     sampling=Sampling(temperature=temperature, seed=0, step=1), sequence=torch.arange(4),
                     vocab_start=0, real_vocab_size=VOCAB, tp_group=None)
        return counter.by_source()

    few, many = counted(2), counted(10)
    assert "project" not in many, many
    assert few == many, (few, many)


def test_the_on_policy_section_is_part_of_the_run_identity(tmp_path):
    """A checkpoint written before the section existed resumes at λ 0 (its keys taken at their
    defaults) and is refused, naming the key, where the config goes on-policy, unless allowed."""
    import yaml

    from core.errors import CheckpointError
    from training.config import identity, load_config
    from training.resume import refuse_drift

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"config": "s.json"}, "teacher": {"path": "t"},
                                    "data": {"train": "d"}, "loss": {"kind": "kl"}}))
    before = {k: v for k, v in identity(load_config(str(path))).items() if not k.startswith("on_policy.")}
    refuse_drift(before, identity(load_config(str(path))), "step_4")
    on = identity(load_config(str(path), ["on_policy.fraction=0.5"]))
    with pytest.raises(CheckpointError, match="on_policy.fraction: checkpoint 0.0 vs config 0.5"):
        refuse_drift(before, on, "step_4")
    refuse_drift(before, on, "step_4", allowed=("on_policy.fraction",))
    with pytest.raises(CheckpointError, match="on_policy.max_new_tokens"):
        refuse_drift(identity(load_config(str(path), ["on_policy.fraction=0.5"])),
                     identity(load_config(str(path), ["on_policy.fraction=0.5", "on_policy.max_new_tokens=8"])),
                     "step_4")


def test_the_scored_rows_give_each_sampled_token_the_log_probability_it_was_drawn_with(monkeypatch):
    """The step scores what generation sampled, at the positions it sampled them: the student's
    log-probability of each target on the scored rows (one forward, no cache, right-padded) equals
    the one at its draw (KV cache, left-padded prompts)."""
    import training.generation as generation

    model = _model(llama, seed=0)
    drawn = []

    def recording(logits, **kwargs):
        token = sample(logits, **kwargs)
        drawn.append(torch.log_softmax(logits.double(), dim=-1).gather(1, token[:, None])[:, 0])
        return token

    sample = generation.sample_tokens
    monkeypatch.setattr(generation, "sample_tokens", recording)
    ids, mask = _left_padded([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    continuation = generate(_engine(model), ids, mask, max_new_tokens=7, sampling=Sampling(1.0, seed=2, step=1),
                            sequence=torch.arange(3), vocab_start=0, real_vocab_size=VOCAB, tp_group=None)
    prompt = SimpleNamespace(ids=ids, mask=mask, lengths=[5, 2, 3])
    scored = scored_micro_batch(prompt, continuation, eos_token_id=EOS, pad_token_id=PAD, loss_on_prompt=False)
    where = scored.positions
    logits = _full_logits(model, scored.input_ids).double()  # (B, L-1, V)
    rows = logits.index_select(1, where.keep).reshape(-1, VOCAB)
    rows = rows if where.select is None else rows[where.select]
    scored_log_probs = torch.log_softmax(rows, dim=-1).gather(1, where.targets[:, None])[:, 0]  # (n,) row-major
    torch.testing.assert_close(scored_log_probs, torch.stack(drawn, dim=1).reshape(-1), rtol=0, atol=1e-5)
