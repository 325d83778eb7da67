"""training.plan's fused logits term against bytes counted in loss.fused itself, and the plan taking
the path the job takes (``loss.fused_head``).

Counted: :func:`loss.fused.fused_objective` forward and backward on real CPU tensors (a tiny head,
256 tokens × 32768 vocabulary: 8 chunks of 32 rows), every storage an op makes tracked until it
is freed (``LiveBytes``). The inputs made before (the student's hidden rows, both heads' weights)
are not counted; the teacher's hidden rows are made inside, as the teacher's forward leaves them.
The plan is a bound: never below the count, and within :data:`FACTOR` of it.
"""

import os
from dataclasses import replace

import pytest
import torch

from loss.fused import OutputLayer, fused_objective
from model_parallel import VocabShard
from model_parallel.testing.memory_counter import LiveBytes
from training.config import load_config
from training.plan import Cluster, Layout, estimate, job_from_config, model_shape
from training.plan.memory import fused_logits_bytes, logits_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCTION = os.path.join(ROOT, "launch", "configs", "gemma2_9b_to_1b.yaml")
TOKENS, VOCAB, TEACHER_HIDDEN = 256, 32768, 96
# buffer_bytes counts three chunk-sized tensors and the kind's whole temporaries at one moment;
# fp32 without a soft-cap two are alive there (counted 1.2-1.32x below the plan).
FACTOR = 1.35


class _NewBytes(LiveBytes):
    """:class:`LiveBytes` that leaves out the storages of ``existing`` tensors: a view of an input
    made before the block (``weight.t()`` in a matmul) is not new memory."""

    def __init__(self, existing):
        super().__init__()
        for tensor in existing:
            self._tracked[tensor.untyped_storage()._cdata] = 0


def _counted_peak(kind: str, hidden_size: int, dtype, softcap) -> int:
    """The most bytes alive at once in one fused call, forward and backward."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, hidden_size, dtype=dtype, generator=generator).requires_grad_()  # (n, H)
    weight = torch.nn.Parameter(0.1 * torch.randn(VOCAB, hidden_size, dtype=dtype, generator=generator))  # (V, H)
    teacher_weight = 0.1 * torch.randn(VOCAB, TEACHER_HIDDEN, dtype=dtype, generator=generator)  # (V, H_t)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)  # (n,)
    teacher = None if kind == "ce" else OutputLayer(teacher_weight, None, softcap)
    with _NewBytes([hidden, weight, teacher_weight, targets]) as counted:
        teacher_rows = None if teacher is None else torch.randn(TOKENS, TEACHER_HIDDEN, dtype=dtype)  # (n, H_t)
        total, out = fused_objective(hidden, OutputLayer(weight, None, softcap), teacher_rows, teacher, targets,
                                     kind=kind, top_k=10, beta=2.0, shard=VocabShard(0, VOCAB, VOCAB))
        total.backward()
        del total, out, teacher_rows
    return counted.peak_bytes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Gemma-2 shapes (soft-capped head) of the two widths, and the teacher's, counted on the meta device."""
    from tests.tiny_models import gemma2, llama

    where = tmp_path_factory.mktemp("shapes")
    result = {}
    for name, config in (("gemma2_8", gemma2(VOCAB, hidden=8)), ("gemma2_64", gemma2(VOCAB, hidden=64)),
                         ("llama_8", llama(VOCAB, hidden=8)), ("llama_64", llama(VOCAB, hidden=64)),
                         ("teacher", llama(VOCAB, hidden=TEACHER_HIDDEN))):
        config.to_json_file(where / f"{name}.json")
        result[name] = model_shape(str(where / f"{name}.json"), vocab=VOCAB, tp=1)
    return result


# (kind, student width, dtype, soft-capped): each of the plan's moments is the largest in one case:
# the chunk's loss (fp32 Llama), the soft-cap at the next chunk's heads (fp32 Gemma-2) and at its
# derivative (bf16 Gemma-2), the weight-gradient accumulation below fp32 (bf16 Llama at H 64), and
# a kind without a teacher.
CASES = [("tail", 8, torch.float32, False), ("tail", 8, torch.bfloat16, False), ("tail", 8, torch.float32, True),
         ("tail", 8, torch.bfloat16, True), ("tail", 64, torch.bfloat16, False), ("ce", 64, torch.bfloat16, True),
         # DeepSpeed's KL ops on each chunk (loss.baselines.kl_buffer_bytes): fp32 and bf16, soft-capped or not.
         ("kl", 8, torch.float32, False), ("kl", 8, torch.bfloat16, True), ("reverse_kl", 8, torch.float32, True),
         ("reverse_kl", 64, torch.bfloat16, False)]


@pytest.mark.parametrize("kind, hidden_size, dtype, softcapped", CASES)
def test_planned_fused_logits_path_bounds_the_counted(shapes, kind, hidden_size, dtype, softcapped):
    student = shapes[f"{'gemma2' if softcapped else 'llama'}_{hidden_size}"]
    assert student.final_softcap == softcapped and student.hidden == hidden_size
    counted = _counted_peak(kind, hidden_size, dtype, 30.0 if softcapped else None)
    w = torch.empty((), dtype=dtype).element_size()
    planned = fused_logits_bytes(student, None if kind == "ce" else shapes["teacher"], TOKENS, VOCAB, w,
                                 device_type="cpu", loss_kind=kind)
    assert counted <= planned <= FACTOR * counted, (kind, hidden_size, dtype, softcapped, counted, planned)


def test_the_fused_term_holds_nothing_tokens_by_vocabulary(shapes):
    """More tokens add their hidden rows and gradients, never a [tokens, V_local] tensor; the unfused
    term grows by at least two logits tensors."""
    student, teacher = shapes["gemma2_64"], shapes["teacher"]
    for w in (2, 4):
        fused = [fused_logits_bytes(student, teacher, tokens, VOCAB, w) for tokens in (8192, 16384)]
        unfused = [logits_bytes(student, tokens, VOCAB, w) for tokens in (8192, 16384)]
        assert fused[1] - fused[0] < 8192 * (student.hidden * (4 + w) + teacher.hidden * w + 256)
        assert unfused[1] - unfused[0] >= 2 * 8192 * VOCAB * w


def test_the_plan_takes_the_path_the_job_takes():
    """loss.fused_head auto (the Gemma-2 pair: supported) plans the fused term, false the unfused
    one; a zero3 teacher adds its gathered head slice to the fused term."""
    cluster, layout = Cluster(), Layout(4, "resident", 1, 8, 2, False)
    planned = {}
    for setting in ("auto", "false", "true"):
        job = job_from_config(load_config(PRODUCTION, [f"loss.fused_head={setting}"]), world_size=16, bf16=True)
        assert job.fused_head == (setting != "false")
        planned[setting] = estimate(job, layout, cluster).memory["logits"]
    tokens, vocab_local = 8 * job.seq_len, job.student.vocab // 4
    assert planned["auto"] == planned["true"] == fused_logits_bytes(job.student, job.teacher, tokens, vocab_local, 2)
    assert planned["false"] == logits_bytes(job.student, tokens, vocab_local, 2)
    zero3 = estimate(job, replace(layout, teacher_placement="zero3"), cluster).memory["logits"]
    assert zero3 == pytest.approx(planned["auto"] + 2 * vocab_local * job.teacher.hidden)
