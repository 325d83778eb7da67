"""Global top-K over a vocabulary split across ranks, with one tie rule for every layout.

Order: value descending, then token id ascending. Each rank proposes its local top-min(K, slice)
as (value, global id) candidates; every rank merges the gathered K·TP candidates with the same
rule and so picks the same K ids, whatever the tensor-parallel size.
"""

import torch


def local_topk(x: torch.Tensor, k: int):
    """Top-``k`` of each row of ``x`` (``[R, V]``, ``k <= V``), ties broken towards the lower index.

    ``torch.topk`` picks an arbitrary subset of values tied at the k-th place; rows where that
    choice matters (more entries equal the k-th value than were taken) are redone with a stable
    sort. Returns ``(values, indices)``, each ``[R, k]``, values descending.
    """
    values, indices = torch.topk(x, k, dim=-1, largest=True, sorted=True)
    if k == 0 or x.shape[0] == 0:
        return values, indices
    kth = values[:, -1:]
    ambiguous = (x == kth).sum(-1) != (values == kth).sum(-1)  # (R,)
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        sorted_values, order = torch.sort(x[rows], dim=-1, descending=True, stable=True)
        values[rows] = sorted_values[:, :k]
        indices[rows] = order[:, :k]
    return values, indices


def select_global_topk(values: torch.Tensor, ids: torch.Tensor, k: int):
    """Pick ``k`` of the candidate ``(values, ids)`` (each ``[N, C]``) by value desc, id asc.

    Deterministic given the candidates, so every rank that holds the same gathered candidates
    picks the same ids in the same order. Returns ``(values, ids)``, each ``[N, k]``.
    """
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    # A stable sort keeps the ascending-id order among equal values.
    values, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return values[:, :k], ids.gather(-1, order[:, :k])
