"""benchmarks/distill.py, benchmarks/logits_memory.py and benchmarks/generation.py: the pairs they
train have the shapes they state, the layouts they time follow the flags, and each runs at a reduced
size (one launch per script: a command, or generation.py's main in-process) with figures that agree
with each other."""

import argparse
import os
import random
import re
import subprocess
import sys
from statistics import median

import pytest

from benchmarks.demo_pair import PAIRS, bpe_tokenizer, refused_overrides
from benchmarks.distill import PARTS, Side, _sides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wide_pair_is_dominated_by_a_vocabulary_of_real_tokens():
    """A BPE tokenizer of exactly V ids, each a distinct byte or merge that the demo corpus uses,
    about 125 times the student's width; the teacher twice as wide."""
    from data.synthetic import story

    wide = PAIRS["wide"]
    assert 8192 <= wide.vocab <= 32768 and 100 <= wide.vocab / wide.student[0] <= 150
    assert wide.teacher[0] == 2 * wide.student[0]
    tokenizer = bpe_tokenizer(wide.vocab)
    vocabulary = tokenizer.get_vocab()
    assert len(tokenizer) == wide.vocab == len(set(vocabulary))
    assert [vocabulary[token] for token in ("<pad>", "<unk>", "<s>", "</s>")] == [0, 1, 2, 3]
    rng = random.Random(1)  # new documents from the corpus' grammar: learned merges, no unknowns, round trip
    text = " ".join(story(rng) for _ in range(200))
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert max(ids) > wide.vocab // 2  # late merges occur in text, not only bytes and early ones


def test_the_small_pair_has_short_sequences():
    small = PAIRS["small"]
    assert small.seq_len == 64 and small.student[0] < PAIRS["demo"].student[0]


def _args(**values):
    defaults = dict(tp=[1, 2], placement=["resident", "zero3"], stage=[0, 1, 2, 3], fused=None)
    return argparse.Namespace(**{**defaults, **values})


def test_sides_follow_the_flags():
    names = [side.name(2) for side in _sides(_args())]
    assert names[:5] == [f"job: TP 1 x DP 2, teacher resident, student ZeRO-{stage}" for stage in range(4)] + [
        "job: TP 1 x DP 2, teacher zero3, student ZeRO-3"]
    assert len(names) == 9 and not any("TP 2" in name and "ZeRO-0" in name for name in names)
    both = _sides(_args(tp=[1], placement=["resident"], stage=[1, "auto"], fused="both"))
    assert [(side.stage, side.fused) for side in both] == [(1, False), (1, True), ("auto", False), ("auto", True)]
    assert both[1].overrides() == ["parallel.tensor_parallel=1", "parallel.teacher_placement=resident",
                                   "parallel.student_zero_stage=1", "loss.fused_head=true"]
    assert "loss.fused_head" not in " ".join(Side(1, "resident", 1).overrides())  # --fused not given: unset


def test_overrides_the_config_refuses_are_named_before_anything_runs():
    assert refused_overrides(["parallel.student_zero_stage=1", "loss.kind=tail"]) == []
    refused = refused_overrides(["parallel.student_zero_stage=7"])
    assert len(refused) == 1 and refused[0].startswith("parallel.student_zero_stage=7 (parallel.student_zero_stage")


def _run(*command):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


NUMBER = r"(-?\d+\.\d+)"


@pytest.mark.e2e
def test_distill_benchmark_times_the_wide_pair_by_part_with_its_peak_memory():
    """One round of one step on one rank, micro-batch 1 x 16, ``student_zero_stage: auto``, the fused
    head on: a baseline row, the stage auto took, a job row whose tokens/s and s/step agree with the
    tokens of a step, every part of the step timed (a part at 0 would mean the step no longer calls
    what the split wraps: loss/head is the fused objective, run inside the student's forward), and
    L as the wide pair's logits."""
    lines = _run("benchmarks/distill.py", "--pair", "wide", "--tp", "1", "--stage", "auto", "--placement", "resident",
                 "--fused", "on", "--ranks", "1", "--rounds", "1", "--steps", "1", "--warmup", "1",
                 "--micro-batch", "1", "--seq-len", "16")
    assert any(line.startswith("wide pair: teacher 256 x 4 layers -> student 128 x 2, V 16,384 (bpe tokenizer)")
               for line in lines)  # the ranks' libraries print to stdout too
    job = "job: TP 1 x DP 1, teacher resident, student ZeRO-auto, fused head on"
    assert any(line.startswith("  baseline: Trainer + DDP") for line in lines)
    table, took, split, memory = [line for line in lines if line.startswith(f"  {job}")]  # in that order
    assert re.fullmatch(rf"  {job}: auto took ZeRO-[0123]", took)  # resolved as the job resolves it
    seconds, tokens_per_s = map(float, re.search(rf"{job}\s+{NUMBER}\s+(\d+)\s+{NUMBER}", table).groups()[:2])
    assert tokens_per_s * seconds == pytest.approx(1 * 16 * 1, rel=0.02)  # micro-batch x sequence x ranks
    parts = [float(value) for value in re.findall(NUMBER, split)]
    assert len(parts) == len(PARTS) + 1 and all(part > 0 for part in parts[:-1])
    assert sum(parts) == pytest.approx(seconds, abs=6e-4)  # other = the step minus the parts
    logits_gb = 16 * 16384 * 4 / 1e9  # L: one micro-batch's fp32 student logits
    assert any(line.startswith("peak memory per rank") and f"L = {logits_gb:.4f} GB" in line for line in lines)
    peak_gb, peak_l = map(float, re.search(rf"{NUMBER} GB\s+{NUMBER} L", memory).groups())
    assert peak_gb > 0 and peak_l == pytest.approx(peak_gb / logits_gb, rel=0.01)


@pytest.mark.e2e
def test_logits_memory_benchmark_sets_the_fused_head_side_by_side():
    """Both ``loss.fused_head`` values on one rank, V 8,192, micro-batch 2 x 256 (the head's weight
    0.125 L): the unfused step holds at least the student's logits (1 L) at its peak, the fused one
    less than the unfused one, for both batch kinds."""
    lines = _run("benchmarks/logits_memory.py", "--vocab", "8192", "--micro-batch", "2", "--seq-len", "256",
                 "--fused", "both")
    assert any(line.startswith("logits path, micro-batch 2 x 256, V 8192 (L = 16.8 MB, fp32)") for line in lines)
    headers = [i for i, line in enumerate(lines) if line.startswith("    batches")]
    assert [lines[i - 1].strip().split(" (")[0] for i in headers] == [
        "the step's peak", "the largest tensor alive at that peak", "the fused loss call's own peak"]
    assert lines[headers[0]].split() == ["batches", "unfused", "fused"] and lines[headers[2]].split() == ["batches", "fused"]

    def row(table, kind):
        line = [line for line in lines[headers[table]:] if line.startswith(f"    {kind} ")][0]
        return list(map(float, re.findall(rf"{NUMBER} L", line)))

    for kind in ("pre-training", "SFT, half the positions masked"):
        (unfused, fused), (largest_unfused, largest_fused), (call,) = row(0, kind), row(1, kind), row(2, kind)
        assert unfused >= 1.0 and fused < unfused, kind
        # Unfused: a [tokens, V] logits tensor (or its SFT half) is alive at the peak; fused: nothing
        # of that size (here ZeRO-3's flat gradient buffer, 0.27 L, is the largest).
        assert largest_unfused >= 0.5 and largest_fused < largest_unfused, kind
        assert 0 < call <= fused, kind


@pytest.mark.e2e
def test_generation_benchmark_prints_positive_costs_and_the_jobs_greedy_tokens_are_transformers(capsys):
    """benchmarks/generation.py in-process (its one rank spawned) on the small pair at B 2, P 4, N 6,
    two rounds, grad_accum 2: every side's figures are present and positive, tokens/s is B·N over a
    call's seconds, the sampler takes a share of the job's generation, the job's greedy tokens equal
    transformers' greedy ones (full vocabulary) on all 2 x B x N, and the on-policy step is its
    generation plus its train_step."""
    from benchmarks.generation import GENERATION_SIDES, main

    rows, prompt, new, rounds = 2, 4, 6, 2
    results = main(["--pair", "small", "--rows", str(rows), "--prompt-tokens", str(prompt), "--new-tokens", str(new),
                    "--rounds", str(rounds), "--steps", "1", "--warmup", "1", "--grad-accum", "2"])
    lines = capsys.readouterr().out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("figures from ")):]  # past libraries' lines
    assert lines[0].startswith("figures from a shared, busy 2-core CPU")
    assert lines[1].startswith("small pair: student 32 x 2 layers, teacher 64 x 4, V 1,024")
    assert any(line.startswith(f"generation: B {rows} rows, prompt P {prompt} tokens, N {new} new tokens")
               for line in lines)
    for name, _, _ in GENERATION_SIDES:
        line = [line for line in lines if line.startswith(f"  {name}  ")][0]
        seconds, rate = map(float, re.search(rf"{NUMBER}\s+{NUMBER}", line[len(name) + 2:]).groups())
        assert seconds > 0 and rate > 0, line
        # One call writes B x N tokens: the median over rounds of B x N / each round's seconds.
        measured = [rows * new / r["seconds"] for r in results["generation"]["rounds"][name]]
        assert len(measured) == rounds and rate == pytest.approx(median(measured), rel=1e-3, abs=0.1)
    shares = re.search(rf"sampler \(model_parallel.sample_tokens\): {NUMBER}% .* temperature 1, {NUMBER}% at "
                       rf"temperature 0", "\n".join(lines)).groups()
    assert all(0 < float(share) < 100 for share in shares)
    agreement = [line for line in lines if "greedy agreement" in line][0]
    assert agreement.endswith(f": 100.00% of {rounds * rows * new} tokens"), agreement
    assert any(line.startswith("step: ") and f"grad_accum 2" in line and f"P + N = {prompt} + {new}" in line
               for line in lines)
    step = {name: float(re.search(rf"^  {re.escape(name)}\s+{NUMBER}", line).group(1))
            for line in lines for name in ("off-policy step", "on-policy step", "  generation", "  train_step")
            if re.match(rf"^  {re.escape(name)}\s", line)}
    assert len(step) == 4 and all(value > 0 for value in step.values()), step
    assert step["on-policy step"] == pytest.approx(step["  generation"] + step["  train_step"], abs=2e-4)
    ratio = float(re.search(rf"on-policy / off-policy: {NUMBER}", "\n".join(lines)).group(1))
    assert ratio == pytest.approx(step["on-policy step"] / step["off-policy step"], abs=0.01)
