"""Training data for the job: prepared directories as they are, raw files prepared on the fly.

Raw files are prepared by rank 0 alone (tokenizing a large corpus can take hours), and the other
ranks must not wait for it inside a collective: NCCL's watchdog ends any collective that runs
longer than ``parallel.timeout_s``. So they wait on the file system
(:func:`model_parallel.file_wait.produced_on_rank_0`): ``data.prepare`` renames the finished
directory, manifest included, into place in one step, so the manifest appearing means the data is
complete; rank 0's error, if any, is written to ``output_dir/data/<split>.failed`` and raised on
every rank; its heartbeat ``<split>.working`` standing still for ``parallel.timeout_s`` (rank 0
killed) ends the wait.
"""

import os

from core.errors import DataError
from data.manifest import MANIFEST
from data.prepare import prepare
from model_parallel.file_wait import produced_on_rank_0


def _is_prepared(directory: str) -> bool:
    return os.path.isdir(directory) and os.path.isfile(os.path.join(directory, MANIFEST))


def ensure_prepared(cfg, path: str, split: str) -> str:
    """A ``data.prepare`` directory for ``path``: itself if prepared, else prepared once by rank 0
    into ``output_dir/data/<split>`` (with ``data.format``, ``data.seq_len`` and the run's tokenizer).

    Collective only in one barrier before the work starts; the other ranks then wait on the file
    system however long the preparation takes, and raise the same :class:`DataError` if it fails.
    """
    if _is_prepared(path):
        return path
    out = os.path.join(cfg.output_dir, "data", split)
    key = f"data.{split}"

    def produce():
        try:
            prepare(cfg.tokenizer or cfg.teacher.path or cfg.student.path, [path], out, fmt=cfg.data.format,
                    seq_len=cfg.data.seq_len)
        except DataError as failure:
            raise DataError(f"{key}: {failure}") from None

    produced_on_rank_0(f"{key}: preparing {path} into {out}", produce, done=lambda: _is_prepared(out), marker=out,
                       limit_s=float(cfg.parallel.timeout_s), error=DataError)
    return out
