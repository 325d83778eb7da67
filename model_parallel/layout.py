"""The vocabulary shard layout, agreed on collectively before any data collective runs."""

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from model_parallel.collectives import gather_rows, group_rank, is_parallel


@dataclass(frozen=True)
class VocabShard:
    """Which contiguous vocabulary slice ``[start, start + size)`` this rank holds."""

    start: int
    """Global id of the first vocabulary entry held here."""
    size: int
    """Entries held here (slices may be uneven across ranks)."""
    global_size: int
    """Vocabulary size summed over the tensor-parallel group."""


def _exchange_device(group, device) -> torch.device:
    """Where the layout check's numbers travel: the current CUDA device on an NCCL group (its only
    kind of tensor), else ``device`` (the logits'; the host when there are none)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device) if device is not None else torch.device("cpu")


def resolve_vocab_shard(local_vocab_size: int,
                        group,
                        *,
                        caller: str,
                        device=None,
                        local_error: Optional[str] = None,
                        must_agree: Mapping[str, float] = {}) -> VocabShard:
    """Validate a call collectively and return this rank's vocabulary slice.

    Rank r of ``group`` holds the r-th contiguous slice; slice sizes are exchanged, not assumed.
    Every rank passes the error its own argument checks found (``local_error``) and the values that
    must be equal on all ranks (``must_agree``: name → number). One all-gather of ``2 + len(must_agree)``
    numbers per rank (on ``device``, the logits' device, as NCCL needs) carries both, so a bad input on any rank makes *every* rank raise ``ValueError``
    here, before the caller starts a collective that the failing rank would never join. Without a
    tensor-parallel group (None, or one rank) the checks are local: no collective, no host sync.
    """
    names = list(must_agree)
    row = [[float(local_error is not None), float(local_vocab_size)] + [float(must_agree[n]) for n in names]]
    if is_parallel(group):
        local = torch.tensor(row, dtype=torch.float64, device=_exchange_device(group, device))
        # host sync: every rank must know the layout (and any rank's error) before the data collectives.
        table = gather_rows(local, group)[0].cpu()  # (ranks, 2 + len(names))
    else:  # one rank: its own row is the table, built on the host (no collective, no host sync)
        table = torch.tensor(row, dtype=torch.float64, device="cpu")
    if local_error is not None:
        raise ValueError(f"{caller}: {local_error}")
    failed = [rank for rank, flag in enumerate(table[:, 0].tolist()) if flag]
    if failed:
        raise ValueError(f"{caller}: tensor-parallel rank(s) {failed} rejected their input (see the error raised "
                         f"there); every rank stops so that none waits in a collective")
    for column, name in enumerate(names, start=2):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"{caller}: {name} differs across tensor-parallel ranks: {values}")
    sizes = [int(s) for s in table[:, 1].tolist()]
    empty = [rank for rank, size in enumerate(sizes) if size < 1]
    if empty:
        raise ValueError(f"{caller}: the vocabulary dimension is empty on tensor-parallel rank(s) {empty} "
                         f"(slice sizes {sizes}); every rank must hold at least one vocabulary entry")
    rank = group_rank(group)
    return VocabShard(start=sum(sizes[:rank]), size=sizes[rank], global_size=sum(sizes))
