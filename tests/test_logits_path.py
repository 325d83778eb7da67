"""The lean logits path (heads on the kept positions only, no copies where every position is
valid) gives the same slices, losses and gradients as selecting positions from full logits."""

from types import SimpleNamespace

import pytest
import torch

from loss.objective import distillation_objective
from tests.tiny_models import gemma2, llama
from training.step import _positions, _slices

VOCAB, REAL = 520, 512  # 8 padded vocabulary columns


def _reference_slices(student, teacher, batch):
    """Today's path before the change: full logits, then [:, :-1][valid], padding masked."""
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    s = student(input_ids=batch["input_ids"]).logits[:, :-1][valid].clone()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1][valid].clone()
    s[:, REAL:] = float("-inf")
    t[:, REAL:] = float("-inf")
    return s, t, targets[valid], valid.nonzero()[:, 0]


@pytest.mark.parametrize("architecture", [llama, gemma2])  # Gemma-2: the head's soft-capping is kept
@pytest.mark.parametrize("masked", [False, True])  # pre-training blocks; SFT rows with masked prompts
def test_lean_path_equals_the_full_logits_path(architecture, masked):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(architecture(VOCAB))
    teacher = AutoModelForCausalLM.from_config(architecture(VOCAB, hidden=48)).eval()
    ids = torch.randint(4, REAL, (3, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if masked:
        labels[0, :10], labels[1, :5], labels[2, :17] = -100, -100, -100
    batch = {"input_ids": ids, "labels": labels}
    engines = SimpleNamespace(student=student, teacher=teacher, vocab_start=0, real_vocab_size=REAL,
                              device=torch.device("cpu"))
    where = _positions(batch)
    assert (where.select is None) == (not masked)
    results = []
    for slices in (_slices(engines, batch, where), None):
        student.zero_grad()
        s, t, targets, rows = slices if slices is not None else _reference_slices(student, teacher, batch)
        out = distillation_objective(s, t, targets, kind="tail", top_k=5, beta=2.0, beta_mode="sequence",
                                     sequence_ids=rows, num_sequences=3, ce_weight=0.3)
        out["loss"].sum().backward()
        results.append((s.detach(), t, targets, rows, out["loss"].detach(),
                        {n: p.grad.clone() for n, p in student.named_parameters()}))
    (s1, t1, y1, r1, l1, g1), (s2, t2, y2, r2, l2, g2) = results
    assert torch.equal(y1, y2) and torch.equal(r1, r2)
    # The same matmuls on fewer rows: equal up to fp32 reassociation in the head's matmul.
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_model_without_logits_to_keep_gets_the_same_slices():
    """Older or remote-code models lack ``logits_to_keep``: their full logits are cut to the kept positions."""
    from transformers import LlamaForCausalLM

    class WithoutLogitsToKeep(LlamaForCausalLM):

        def forward(self, input_ids=None, attention_mask=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    torch.manual_seed(0)
    student = WithoutLogitsToKeep(llama(VOCAB))
    teacher = WithoutLogitsToKeep(llama(VOCAB, hidden=48)).eval()
    ids = torch.randint(4, REAL, (3, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :10] = -100
    batch = {"input_ids": ids, "labels": labels}
    engines = SimpleNamespace(student=student, teacher=teacher, vocab_start=0, real_vocab_size=REAL,
                              device=torch.device("cpu"))
    lean = _slices(engines, batch, _positions(batch))
    for got, expected in zip(lean, _reference_slices(student, teacher, batch)):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=0)  # the same logits, copied out


# Gemma-2 (eager only in transformers): sliding-window layers shorter than the rows.
@pytest.mark.parametrize("architecture, attention", [(llama, "sdpa"), (llama, "eager"), (gemma2, "eager")])
def test_padded_rows_get_the_logits_of_each_row_alone(architecture, attention):
    """Right-padded SFT rows: the step's models see no padding mask (causal attention keeps real
    positions from the pads), and each valid position's logits equal those of its row run alone,
    unpadded; targets and rows come from the host batch."""
    from transformers import AutoModelForCausalLM

    from data.loader import Collator

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(architecture(VOCAB), attn_implementation=attention)
    teacher = AutoModelForCausalLM.from_config(architecture(VOCAB, hidden=48), attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(2)
    lengths, prompts = (24, 9, 17), (10, 3, 0)
    rows = []
    for length, prompt in zip(lengths, prompts):
        ids = torch.randint(4, REAL, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = Collator(pad_token_id=0)(rows)
    assert "attention_mask" in batch  # padded: the collator marks it, the step does not need it
    engines = SimpleNamespace(student=student, teacher=teacher, vocab_start=0, real_vocab_size=REAL,
                              device=torch.device("cpu"))
    with torch.no_grad():
        s, t, targets, row_ids = _slices(engines, batch, _positions(batch))
        expected = {name: [] for name in ("s", "t", "targets", "rows")}
        for r, (row, length) in enumerate(zip(rows, lengths)):
            ids = torch.tensor([row["input_ids"]])
            has_target = torch.tensor(row["labels"][1:]) != -100  # (length - 1,)
            for name, model in (("s", student), ("t", teacher)):
                logits = model(input_ids=ids).logits[0, :-1][has_target].clone()
                logits[:, REAL:] = float("-inf")
                expected[name].append(logits)
            expected["targets"].append(torch.tensor(row["labels"][1:])[has_target])
            expected["rows"].append(torch.full((int(has_target.sum()),), r))
    expected = {name: torch.cat(values) for name, values in expected.items()}
    assert torch.equal(targets, expected["targets"]) and torch.equal(row_ids, expected["rows"])
    # Shorter sequences take other kernel shapes: equal up to fp32 reassociation.
    torch.testing.assert_close(s, expected["s"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, expected["t"], rtol=1e-5, atol=1e-5)


def test_a_left_padded_batch_is_refused():
    """The models get no padding mask, which is exact for right padding only: left padding stops."""
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}
    with pytest.raises(ValueError, match="padded on the left"):
        _positions(batch)
    batch["attention_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert _positions(batch).tokens == 6
