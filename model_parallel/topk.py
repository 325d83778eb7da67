"""Global top-K over a vocabulary split across ranks, with one tie rule for every layout.

Order: value descending, then token id ascending. Each rank proposes its local top-min(K, slice)
as (value, global id) candidates; every rank ranks the gathered K·TP candidates with the same rule
and so picks the same K ids, whatever the tensor-parallel size.
"""

import torch


def local_topk(x: torch.Tensor, k: int):
    """Top-``k`` of each row of ``x`` (``[R, V]``, ``1 <= k <= V``), ties going to the lower index.

    Returns ``(values [R, k] descending, indices [R, k], next_value [R])`` where ``next_value`` is
    the largest value left out (``-inf`` when ``k == V``): the maximum of the row's remainder.

    ``torch.topk`` picks an arbitrary subset of entries tied at the k-th place. Taking one more
    entry shows which rows that can affect (the k-th and (k+1)-th values are equal); only those
    rows are redone with a stable sort, so the common case costs one ``topk`` and no extra pass.
    """
    vocab = x.shape[-1]
    take = min(k + 1, vocab)
    values, indices = torch.topk(x, take, dim=-1, largest=True, sorted=True)
    if take > k:
        ambiguous = values[:, k - 1] == values[:, k]
        if ambiguous.any():  # host sync: one flag, to skip the stable re-sort when nothing is tied
            rows = ambiguous.nonzero().squeeze(1)
            sorted_values, order = torch.sort(x[rows], dim=-1, descending=True, stable=True)
            values[rows], indices[rows] = sorted_values[:, :take], order[:, :take]
        next_value = values[:, k]
    else:
        next_value = torch.full_like(values[:, 0], float("-inf"))
    return values[:, :k], indices[:, :k], next_value


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
