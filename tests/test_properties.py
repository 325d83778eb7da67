"""Properties of the tail-aware divergence that hold for any logits (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loss import tail_divergence, tail_divergence_parts
from tests.reference import reference_kl

# fp32 computation checked against float64 KL on logits of magnitude <= 20.
TOL = 2e-5


@st.composite
def logit_pairs(draw, max_vocab=24):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 6.0))
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator) * scale
    teacher = torch.randn(rows, vocab, generator=generator) * scale
    if draw(st.booleans()):  # quantised teacher: many ties
        teacher = torch.round(teacher)
    return student, teacher


settings.register_profile("ci", max_examples=60, deadline=None)
settings.load_profile("ci")


@given(logit_pairs(), st.integers(0, 30), st.floats(0.5, 3.0))
def test_teacher_tail_mass_as_beta_is_forward_kl(pair, top_k, temperature):
    student, teacher = pair
    p_tail = tail_divergence_parts(student, teacher, top_k=top_k, temperature=temperature).teacher_tail_mass
    value = tail_divergence(student, teacher, top_k=top_k, beta=p_tail, temperature=temperature)
    torch.testing.assert_close(value.double(), reference_kl(student, teacher, temperature), rtol=TOL, atol=TOL)


@given(logit_pairs(), st.floats(0.0, 5.0))
def test_k_zero_is_beta_times_kl(pair, beta):
    student, teacher = pair
    value = tail_divergence(student, teacher, top_k=0, beta=beta)
    torch.testing.assert_close(value.double(), beta * reference_kl(student, teacher), rtol=TOL, atol=TOL)


@given(logit_pairs(), st.integers(0, 5), st.floats(0.0, 5.0))
def test_k_at_least_vocabulary_is_kl(pair, extra, beta):
    student, teacher = pair
    parts = tail_divergence_parts(student, teacher, top_k=teacher.shape[-1] + extra)
    assert (parts.tail_kl == 0).all() and (parts.teacher_tail_mass == 0).all()
    value = tail_divergence(student, teacher, top_k=teacher.shape[-1] + extra, beta=beta)
    torch.testing.assert_close(value.double(), reference_kl(student, teacher), rtol=TOL, atol=TOL)


@given(logit_pairs(), st.integers(0, 30), st.floats(0.0, 5.0))
def test_nonnegative_and_zero_at_the_teacher(pair, top_k, beta):
    student, teacher = pair
    assert (tail_divergence(student, teacher, top_k=top_k, beta=beta) >= -TOL).all()
    assert (tail_divergence(teacher.clone(), teacher, top_k=top_k, beta=beta).abs() <= TOL).all()


@given(logit_pairs(), st.integers(0, 30), st.floats(-30.0, 30.0), st.floats(-30.0, 30.0))
def test_invariant_to_a_constant_added_to_a_row(pair, top_k, student_shift, teacher_shift):
    student, teacher = pair
    value = tail_divergence(student, teacher, top_k=top_k, beta=2.0)
    shifted = tail_divergence(student + student_shift, teacher + teacher_shift, top_k=top_k, beta=2.0)
    # A shift of up to 30 costs fp32 up to ~30·2**-24 per logit in the shifted inputs themselves.
    torch.testing.assert_close(shifted, value, rtol=1e-4, atol=1e-4)
