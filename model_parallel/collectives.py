"""The collectives the vocabulary-parallel losses use, over an optional tensor-parallel group.

``group=None`` means "no tensor parallelism" (as in ``deepspeed.comm.pg_utils``), never the world
group, so these helpers also work before ``torch.distributed`` is initialised.
"""

import torch
import torch.distributed as dist


def _all_gather_single(output, input, group):
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; looked up at
    # call time so that tests can count what passes through it.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group)


def is_parallel(group) -> bool:
    """Whether a collective over ``group`` has any effect (the group exists and spans > 1 rank)."""
    return group is not None and dist.get_world_size(group) > 1


def group_rank(group) -> int:
    return dist.get_rank(group) if is_parallel(group) else 0


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` in place and return it (unchanged without a group)."""
    if is_parallel(group):
        dist.all_reduce(tensor, group=group)
    return tensor


class _Done:
    """The handle of a collective that had nothing to do."""

    def wait(self) -> bool:
        return True


def start_all_reduce_sum(tensor: torch.Tensor, group):
    """Start summing ``tensor`` over ``group`` in place; returns a handle whose ``wait()`` must run
    before ``tensor`` is read. The sum overlaps with whatever the caller runs in between (gloo
    runs it on its own thread; NCCL on its stream, and ``wait()`` orders the caller's stream after it)."""
    if is_parallel(group):
        return dist.all_reduce(tensor, group=group, async_op=True)
    return _Done()


def gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """All-gather per-token rows from every rank of ``group``.

    ``local`` is ``[N, C]`` on every rank (same N, C and dtype). Returns ``[N, ranks, C]``, ordered
    by group rank and bit-identical on every rank, so any reduction over the rank dimension done
    afterwards is too. One all-gather of ``N * C`` elements per rank; a view of ``local`` without a
    group.
    """
    if not is_parallel(group):
        return local.unsqueeze(1)
    ranks = dist.get_world_size(group)
    # Rank-major, concatenated along the first dimension: the layout every backend accepts.
    gathered = torch.empty((ranks * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    _all_gather_single(gathered, local.contiguous(), group=group)
    return gathered.view(ranks, *local.shape).movedim(0, 1)
