"""Training data for the job: prepared directories as they are, raw files prepared on the fly."""

import os

import torch.distributed as dist

from core.errors import DataError
from data.manifest import MANIFEST
from data.prepare import prepare


def ensure_prepared(cfg, path: str, split: str) -> str:
    """A ``data.prepare`` directory for ``path``: itself if prepared, else prepared once by rank 0
    into ``output_dir/data/<split>`` (with ``data.format``, ``data.seq_len`` and the run's tokenizer).

    A failure on rank 0 is broadcast, so every rank raises the same :class:`DataError`.
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    out = os.path.join(cfg.output_dir, "data", split)
    error = [None]
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(out, MANIFEST)):
        try:
            prepare(cfg.tokenizer or cfg.teacher.path or cfg.student.path, [path], out, fmt=cfg.data.format,
                    seq_len=cfg.data.seq_len)
        except DataError as failure:
            error = [f"data.{split}: {failure}"]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise DataError(error[0])
    return out
