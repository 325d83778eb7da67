"""tail_divergence on one process against the float64 reference in tests/reference.py."""

import pytest
import torch

import loss.tail
from loss import tail_divergence, tail_divergence_parts
from tests.losses import TailDivergence
from tests.reference import reference_divergence, reference_kl, reference_parts


def _logits(*shape, scale=3.0, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def _check_against_reference(student, teacher, *, top_k, beta, temperature=1.0, value_tol=1e-5, grad_tol=1e-5):
    """Values and student gradients (for a random upstream gradient) vs the float64 reference."""
    student = student.detach().requires_grad_(True)
    value = tail_divergence(student, teacher, top_k=top_k, beta=beta, temperature=temperature)
    upstream = torch.randn(value.shape, generator=torch.Generator().manual_seed(1))
    value.backward(upstream)

    leaf = student.detach().double().requires_grad_(True)
    expected = reference_divergence(leaf, teacher.double(), top_k, beta, temperature)
    expected.backward(upstream.double())

    assert value.dtype == torch.float32 and value.shape == student.shape[:-1]
    torch.testing.assert_close(value.double(), expected.detach(), rtol=value_tol, atol=value_tol)
    assert student.grad.dtype == student.dtype
    torch.testing.assert_close(student.grad.double(), leaf.grad, rtol=grad_tol, atol=grad_tol)
    return value


@pytest.mark.parametrize("top_k", [0, 1, 5, 40, 64, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference_fp32(top_k, temperature):
    _check_against_reference(_logits(16, 64, seed=2), _logits(16, 64, seed=3), top_k=top_k, beta=2.0,
                             temperature=temperature)


def test_three_dimensional_input_and_tensor_beta():
    student, teacher = _logits(3, 5, 50, seed=4), _logits(3, 5, 50, seed=5)
    beta = torch.rand(3, 5, generator=torch.Generator().manual_seed(6)) * 3
    _check_against_reference(student, teacher, top_k=7, beta=beta)
    _check_against_reference(student, teacher, top_k=7, beta=beta[:, :1])  # broadcasts over positions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_fp32(dtype):
    student, teacher = _logits(8, 96, seed=7, dtype=dtype), _logits(8, 96, seed=8, dtype=dtype)
    # Values are computed in fp32 from inputs exactly representable there: fp32 tolerance. The
    # gradient is returned in the input dtype, so it carries that dtype's rounding (2**-8 for bf16).
    grad_tol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    _check_against_reference(student, teacher, top_k=5, beta=2.0, grad_tol=grad_tol)


def test_empty_batch():
    student = torch.zeros(0, 7, 33, requires_grad=True)
    value = tail_divergence(student, torch.zeros(0, 7, 33), top_k=3, beta=2.0)
    assert value.shape == (0, 7)
    value.sum().backward()
    assert student.grad.shape == student.shape


def test_parts_match_reference_and_compose():
    student, teacher = _logits(12, 40, seed=9), _logits(12, 40, seed=10)
    parts = tail_divergence_parts(student, teacher, top_k=6)
    for got, expected in zip(parts, reference_parts(student, teacher, 6)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    combined = tail_divergence(student, teacher, top_k=6, beta=1.7)
    torch.testing.assert_close(combined, parts.head_kl + 1.7 * parts.tail_kl)
    assert not parts.teacher_tail_mass.requires_grad


def test_parts_gradients_are_separate():
    """head_kl and tail_kl are each differentiable, with their own gradients."""
    teacher = _logits(6, 30, seed=11)
    for index in (0, 1):
        student = _logits(6, 30, seed=12).requires_grad_(True)
        tail_divergence_parts(student, teacher, top_k=4)[index].sum().backward()
        leaf = _logits(6, 30, seed=12).double().requires_grad_(True)
        reference_parts(leaf, teacher, 4)[index].sum().backward()
        torch.testing.assert_close(student.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)


def test_teacher_tail_mass_as_beta_gives_forward_kl():
    student, teacher = _logits(10, 50, seed=13), _logits(10, 50, seed=14)
    p_tail = tail_divergence_parts(student, teacher, top_k=5).teacher_tail_mass
    torch.testing.assert_close(tail_divergence(student, teacher, top_k=5, beta=p_tail).double(),
                               reference_kl(student, teacher), rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient():
    student = _logits(4, 20, seed=15).requires_grad_(True)
    teacher = _logits(4, 20, seed=16).requires_grad_(True)
    tail_divergence(student, teacher, top_k=3, beta=2.0).sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_module_binds_hyper_parameters():
    student, teacher = _logits(4, 20, seed=17), _logits(4, 20, seed=18)
    module = TailDivergence(top_k=3, beta=2.0, temperature=1.5)
    torch.testing.assert_close(module(student, teacher),
                               tail_divergence(student, teacher, top_k=3, beta=2.0, temperature=1.5))


def test_chunk_boundaries(monkeypatch):
    """One row per chunk: every statistic crosses a chunk boundary."""
    monkeypatch.setattr(loss.tail, "CHUNK_NUMEL", 1)
    _check_against_reference(_logits(9, 37, seed=19), _logits(9, 37, seed=20), top_k=4, beta=2.0)


def test_ties_go_to_the_lower_token_id():
    teacher = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0]] * 2)
    student = _logits(2, 7, seed=21)
    # Top-2 must be ids 1 and 3 (not 4 or 6): the tail then holds ids 4 and 6 at value 3.
    parts = tail_divergence_parts(student, teacher, top_k=2)
    p = torch.softmax(teacher[0].double(), -1)
    torch.testing.assert_close(parts.teacher_tail_mass[0].double(), 1 - p[1] - p[3])
    q = torch.softmax(student[0].double(), -1)
    torch.testing.assert_close(parts.student_tail_mass[0].double(), 1 - q[1] - q[3], rtol=1e-6, atol=1e-7)
    _check_against_reference(student, teacher, top_k=2, beta=2.0)
    # Many tied rows at once, and ties among the very largest values.
    tied = torch.round(_logits(32, 50, seed=22, scale=1.0))
    _check_against_reference(_logits(32, 50, seed=23), tied, top_k=6, beta=2.0)


@pytest.mark.parametrize("block", [None, 2, 3])  # the module's block size; blocks smaller than the rows
def test_local_topk_takes_the_lowest_tied_ids_without_a_host_flag(monkeypatch, block):
    """local_topk against a stable sort (value descending, then id): ties at the k-th place in many
    patterns (constant rows, -inf runs, ties spanning blocks, rows whose ties outnumber k), rows
    longer and shorter than the tie search's blocks."""
    import model_parallel.topk as topk

    if block is not None:
        monkeypatch.setattr(topk, "_TIE_BLOCK", block)
    generator = torch.Generator().manual_seed(31)
    for vocab in (1, 7, 40, 300, 2000):
        x = torch.round(torch.randn(8, vocab, generator=generator) * 1.5)
        x[0] = 1.0
        x[1, ::3] = float("-inf")
        x[2] = float("-inf")
        x[3, 5:] = -2.0
        x[4, vocab // 2:] = x[4].max()  # the largest value tied over the second half
        x[5] = torch.randn(vocab, generator=generator)  # no ties
        for k in sorted({1, 2, 5, 11, vocab // 3, vocab - 1, vocab} & set(range(1, vocab + 1))):
            values, indices, next_value = topk.local_topk(x, k)
            expected_values, order = torch.sort(x, dim=-1, descending=True, stable=True)
            assert torch.equal(values, expected_values[:, :k])
            assert torch.equal(indices.sort(dim=1).values, order[:, :k].sort(dim=1).values), (vocab, k)
            assert torch.equal(x.gather(1, indices), values)  # each value sits at its id
            expected_next = expected_values[:, k] if k < vocab else torch.full((8,), float("-inf"))
            assert torch.equal(next_value, expected_next)


def test_peaked_teacher_keeps_an_exact_tail():
    """Tail mass ~1e-13: the renormalised tail KL is still exact (no log(1 − Σ top) cancellation)."""
    teacher = _logits(6, 64, seed=24, scale=1.0)
    teacher[:, 0] += 33.0
    student = _logits(6, 64, seed=25)
    parts = tail_divergence_parts(student, teacher, top_k=1)
    expected = reference_parts(student, teacher, 1)
    assert 1e-15 < parts.teacher_tail_mass.max() < 1e-11
    torch.testing.assert_close(parts.teacher_tail_mass.double(), expected[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(parts.tail_kl.double(), expected[1], rtol=1e-5, atol=1e-6)
    assert expected[1].min() > 0.1  # the tail term is O(1): a cancellation would have destroyed it
    _check_against_reference(student, teacher, top_k=1, beta=2.0)


def test_padded_vocabulary_columns():
    """-inf columns carry no mass, get zero gradient and are not chosen while finite entries remain."""
    student, teacher = _logits(5, 40, seed=26), _logits(5, 40, seed=27)
    student[:, 30:] = float("-inf")
    teacher[:, 30:] = float("-inf")
    for top_k in (3, 30, 35):
        value = _check_against_reference(student, teacher, top_k=top_k, beta=2.0)
        assert torch.isfinite(value).all()
    student = student.requires_grad_(True)
    tail_divergence(student, teacher, top_k=3, beta=2.0).sum().backward()
    assert (student.grad[:, 30:] == 0).all()
    # K = 30 takes exactly the finite entries: no teacher tail mass is left.
    assert (tail_divergence_parts(student, teacher, top_k=30).teacher_tail_mass == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_donated_teacher_buffer_holds_the_same_gradient_and_saves_one_logits_tensor(dtype):
    """donate_teacher: bit-identical values and gradients, the gradient written into the teacher's
    storage, and backward's peak one [n, V] tensor lower (live tensor bytes, deterministic)."""
    from model_parallel.testing.memory_counter import LiveBytes

    n, vocab = 64, 3000
    logits_bytes = n * vocab * torch.empty((), dtype=dtype).element_size()
    results = {}
    for donate in (False, True):
        student, teacher = _logits(n, vocab, seed=40, dtype=dtype), _logits(n, vocab, seed=41, dtype=dtype)
        student[:, -7:], teacher[:, -7:] = float("-inf"), float("-inf")  # padded columns: zero gradient
        student.requires_grad_(True)
        value = tail_divergence(student, teacher, top_k=5, beta=2.0, donate_teacher=donate)
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(2))
        with LiveBytes() as counted:
            value.backward(upstream)
        results[donate] = (value.detach(), student.grad, counted.peak_bytes, teacher)
    (v0, g0, peak0, t0), (v1, g1, peak1, t1) = results[False], results[True]
    assert torch.equal(v0, v1) and torch.equal(g0, g1) and g1.dtype == dtype
    assert (g1[:, -7:] == 0).all()
    assert g1.untyped_storage().data_ptr() == t1.untyped_storage().data_ptr()  # the teacher's storage
    assert torch.equal(t0, _logits(n, vocab, seed=41, dtype=dtype).index_fill_(1, torch.arange(vocab - 7, vocab),
                                                                               float("-inf")))  # not donated: intact
    assert peak0 - peak1 >= 0.99 * logits_bytes


def test_a_teacher_of_another_dtype_is_not_donated():
    student = _logits(8, 50, seed=42).requires_grad_(True)
    teacher = _logits(8, 50, seed=43, dtype=torch.bfloat16)
    kept = teacher.clone()
    tail_divergence(student, teacher, top_k=3, beta=2.0, donate_teacher=True).sum().backward()
    assert torch.equal(teacher, kept) and student.grad.dtype == torch.float32


def test_fully_masked_rows_give_zero_value_and_gradient():
    student, teacher = _logits(4, 25, seed=28), _logits(4, 25, seed=29)
    student[1] = float("-inf")
    teacher[1] = float("-inf")
    student = student.requires_grad_(True)
    value = tail_divergence(student, teacher, top_k=3, beta=2.0)
    value.sum().backward()
    assert value[1] == 0 and torch.isfinite(value).all()
    assert (student.grad[1] == 0).all() and torch.isfinite(student.grad).all()
    rows = [0, 2, 3]
    _check_against_reference(student.detach()[rows], teacher[rows], top_k=3, beta=2.0)


def test_student_equal_to_teacher_is_zero():
    teacher = _logits(8, 33, seed=30)
    student = teacher.clone().requires_grad_(True)
    value = tail_divergence(student, teacher, top_k=4, beta=2.0)
    value.sum().backward()
    assert value.abs().max() < 1e-6
    assert student.grad.abs().max() < 1e-6


BAD_INPUTS = [
    (dict(student=torch.zeros(2, 5), teacher=torch.zeros(2, 6)), "student_logits"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(beta=-0.5), "beta"),
    (dict(beta=torch.tensor([1.0, -1.0])), "beta"),
    (dict(beta=torch.ones(3)), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(student=torch.zeros(2, 5, dtype=torch.long)), "student_logits"),
    (dict(teacher=torch.zeros(2, 5, dtype=torch.int32)), "teacher_logits"),
    (dict(student=torch.zeros(2, 0), teacher=torch.zeros(2, 0)), "vocabulary dimension is empty"),
]


@pytest.mark.parametrize("overrides, named", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(overrides, named):
    arguments = dict(student=torch.zeros(2, 5), teacher=torch.zeros(2, 5), top_k=2, beta=1.0, temperature=1.0)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=named):
        tail_divergence(arguments["student"],
                        arguments["teacher"],
                        top_k=arguments["top_k"],
                        beta=arguments["beta"],
                        temperature=arguments["temperature"])
