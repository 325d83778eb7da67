"""What the loss registry tells the rest of the code about each kind, checked against figures
written out here independently of it."""

import pytest

from loss.registry import LOSSES


@pytest.mark.parametrize("top_k, vocab, expected", [
    (0, 100, 5 + 2),  # no top-K: 5 statistics and the teacher's argmax (2)
    (1, 100, 5 + 3),
    (10, 100, 5 + 30),  # K candidates travel with teacher logit, student logit and id
    (100, 100, 5 + 300),
    (250, 100, 5 + 300),  # K is clamped to the vocabulary
])
def test_tail_exchange_is_five_statistics_and_three_numbers_per_candidate(top_k, vocab, expected):
    assert LOSSES["tail"].exchange_numbers(top_k, vocab) == expected


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "ce"])
def test_other_kinds_exchange_two_argmaxes(kind):
    for top_k, vocab in ((0, 7), (10, 32000), (10**6, 10)):
        assert LOSSES[kind].exchange_numbers(top_k, vocab) == 2 + 2


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_buffer_bytes_are_the_tail_chunk_bound_for_every_kind(kind):
    entry = LOSSES[kind]
    cpu_chunk, cuda_chunk = 1 << 18, 1 << 24  # loss.tail's CPU_CHUNK_NUMEL and CHUNK_NUMEL
    # Few logits: the chunk is all of them; 4 fp32 buffers, 2 more for 2-byte logits' fp32 copies.
    assert entry.buffer_bytes(10, 100, 4, "cpu") == 4 * 4 * 1000
    assert entry.buffer_bytes(10, 100, 2, "cuda") == 6 * 4 * 1000
    # Many logits: one chunk's worth, smaller on CPU.
    assert entry.buffer_bytes(4096, 32000, 2, "cpu") == 6 * 4 * cpu_chunk
    assert entry.buffer_bytes(4096, 32000, 2, "cuda") == 6 * 4 * cuda_chunk
    assert entry.buffer_bytes(4096, 32000, 4, "cuda") == 4 * 4 * cuda_chunk
