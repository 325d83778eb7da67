"""Global top-K over a vocabulary split across ranks, with one tie rule for every layout.

Order: value descending, then token id ascending. Each rank proposes its local top-min(K, slice)
as (value, global id) candidates; every rank ranks the gathered K·TP candidates with the same rule
and so picks the same K ids, whatever the tensor-parallel size.
"""

import torch


# Ties at the k-th place are looked up in blocks of this many entries (see local_topk).
_TIE_BLOCK = 128


def _nth_equal(x: torch.Tensor, target: torch.Tensor, nth: torch.Tensor, real=None) -> torch.Tensor:
    """Column of the ``nth`` (``[R, k]`` int32, from 1) entry of each row of ``x`` (``[R, C]``) equal
    to ``target`` (``[R, 1]``), counting in column order and only where ``real`` (``[R, C]`` bool, or
    None for all); a rank past the row's matches gives some column in range."""
    equal = x == target  # (R, C)
    if real is not None:
        equal &= real
    seen = torch.cumsum(equal, dim=1, dtype=torch.int32)  # (R, C) matches up to each column
    return torch.searchsorted(seen, nth).clamp_(max=x.shape[1] - 1)  # (R, k)


def local_topk(x: torch.Tensor, k: int):
    """Top-``k`` of each row of ``x`` (``[R, V]``, ``1 <= k <= V``), ties going to the lower index.

    Returns ``(values [R, k] descending, indices [R, k], next_value [R])`` where ``next_value`` is
    the largest value left out (``-inf`` when ``k == V``): the maximum of the row's remainder.

    ``torch.topk`` returns the right values but an arbitrary subset of the entries tied at the
    k-th place. So, on every row and without a host sync (no flag decides which rows are redone):
    the ``above`` entries greater than the k-th value ``v`` keep topk's first ``above`` places (all
    of them are in it, whichever ties it took); the other ``k − above`` places go to the first
    entries equal to ``v`` in index order. Those lie in the first k blocks of ``_TIE_BLOCK`` entries
    whose maximum is ≥ v (at most ``above`` of those blocks hold no tie), so beyond the one
    ``topk`` this costs one block-maximum reduction over the row and work on ``[R, k·_TIE_BLOCK]``:
    no temporaries of the row's size. Rows without a tie keep the ids topk gave.
    """
    rows, vocab = x.shape
    take = min(k + 1, vocab)
    values, indices = torch.topk(x, take, dim=-1, largest=True, sorted=True)  # (R, take)
    if take == k:
        return values, indices, torch.full_like(values[:, 0], float("-inf"))
    boundary = values[:, k - 1:k]  # (R, 1) the k-th value
    above = (values[:, :k] > boundary).sum(dim=1, keepdim=True, dtype=torch.int32)  # (R, 1) strictly above it
    place = torch.arange(1, k + 1, dtype=torch.int32, device=x.device)  # (k,) places, from 1
    nth_tie = (place - above).clamp_(min=1)  # (R, k) which tie fills each place past `above`
    block, blocks = _TIE_BLOCK, -(-vocab // _TIE_BLOCK)
    if blocks <= k:  # a short row: search it whole
        tie_index = _nth_equal(x, boundary, nth_tie)
    else:
        whole = vocab // block * block
        maxima = x[:, :whole].reshape(rows, whole // block, block).amax(dim=2)  # (R, blocks)
        if whole < vocab:
            maxima = torch.cat([maxima, x[:, whole:].amax(dim=1, keepdim=True)], dim=1)
        # The first k blocks holding an entry >= v, in order. Where fewer than k do, the last block
        # stands in for the missing ones: its copies come after every real tie, which suffice.
        reaching = torch.cumsum(maxima >= boundary, dim=1, dtype=torch.int32)  # (R, blocks)
        chosen = torch.searchsorted(reaching, place.repeat(rows, 1)).clamp_(max=blocks - 1)  # (R, k)
        offsets = torch.arange(block, device=x.device)  # (block,)
        columns = torch.add(offsets, chosen.unsqueeze(2), alpha=block).view(rows, k * block)  # (R, k·block)
        real = None
        if whole < vocab:  # the last block is short: its columns past the row are not entries
            real = columns < vocab
            columns.clamp_(max=vocab - 1)
        found = _nth_equal(x.gather(1, columns), boundary, nth_tie, real)  # (R, k)
        tie_index = columns.gather(1, found)
    indices = torch.where(place <= above, indices[:, :k], tie_index)
    return values[:, :k], indices, values[:, k]


def rank_candidates(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Permutation ``[N, C]`` sorting each row of candidates by value desc, then id asc.

    Deterministic given the candidates, so every rank holding the same gathered candidates ranks
    them identically; the first K of the permutation are the global top-K.
    """
    by_id = ids.argsort(dim=-1)
    # A stable sort keeps the ascending-id order among equal values.
    by_value = torch.sort(values.gather(-1, by_id), dim=-1, descending=True, stable=True).indices
    return by_id.gather(-1, by_value)


def global_argmax(logits: torch.Tensor, start: int, group) -> torch.Tensor:
    """Global token id of each row's maximum over vocabulary slices (``[n, V_local]`` → ``[n]``).

    Ties go to the lower id, as for the top-K. One all-gather of two numbers per row per rank.
    """
    from model_parallel.collectives import gather_rows

    # max in the logits' own dtype (exact; no fp32 copy of [n, V_local]); only the [n] maxima are cast.
    values, index = logits.max(dim=-1)
    # Ids travel as fp32, exact below 2**24 (never in the logits' dtype: bf16 is exact only up to 256).
    local = torch.stack([values.float(), (index + start).float()], dim=1)
    gathered = gather_rows(local, group)  # (n, ranks, 2)
    order = rank_candidates(gathered[:, :, 0], gathered[:, :, 1].long())
    return gathered[:, :, 1].long().gather(1, order[:, :1]).squeeze(1)
