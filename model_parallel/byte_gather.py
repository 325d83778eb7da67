"""Gather a few bytes from every rank with tensor collectives, never through pickle.

``torch.distributed.all_gather_object`` pickles each object, copies it to the device and back and
runs several collectives per call; on NCCL that is a device round-trip that DESIGN.md §6 keeps off
any path that repeats (checkpoint saves, steps). :func:`all_gather_bytes` moves each rank's bytes
as a ``uint8`` tensor on the given device (the engine's: NCCL takes device tensors only) in two
all-gathers: the lengths, then the payloads zero-padded to the longest. Callers encode what they
send (JSON, a digest) and decode what comes back, so nothing unpickled ever arrives.
"""

from typing import List, Optional

import torch
import torch.distributed as dist


def all_gather_bytes(data: bytes, *, device, group: Optional[dist.ProcessGroup] = None) -> List[bytes]:
    """Collective over ``group`` (the default group if None): ``[bytes of group rank 0, of rank 1, ...]``.

    Two ``all_gather`` calls of tensors on ``device``: one int64 length per rank, then each rank's
    bytes padded to the longest. Returns ``[data]`` without a collective when no group is
    initialised or it has one rank. Reads the gathered tensors back to the host once (a host sync).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [bytes(data)]
    world = dist.get_world_size(group)
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)  # (1,)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    # host sync: the payload size must be known on the host to allocate the padded buffers
    sizes = [int(n) for n in torch.cat(lengths).tolist()]
    longest = max(max(sizes), 1)
    payload = torch.zeros(longest, dtype=torch.uint8, device=device)  # (longest,)
    if data:
        payload[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    payloads = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(payloads, payload, group=group)
    # host sync: the caller decodes the bytes on the host
    gathered = torch.stack(payloads).cpu()  # (world, longest)
    return [bytes(gathered[rank, :size].numpy().tobytes()) for rank, size in enumerate(sizes)]
