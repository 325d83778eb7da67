"""Batches for training and evaluation from data prepared by ``data.prepare``.

The training sample stream is a function of ``(seed, global batch size)`` only: an endless
concatenation of per-epoch permutations (epoch e shuffled by ``(seed, e)``), cut into global
batches of ``global_batch_size`` samples. Nothing is dropped: a batch may straddle two epochs
(never holding a sample twice), so one epoch's worth of steps visits every sample once. Global batch k is split into ``grad_accum`` micro-steps
of ``dp_size`` micro-batches each; data-parallel rank r takes micro-batch r of every micro-step.
So the samples of step k are the same for any data-parallel size (with ``grad_accum`` adjusted),
tensor-parallel ranks of one data-parallel group (same ``dp_rank``) get identical batches, and the
whole position is one integer, ``consumed_samples``, that goes into checkpoints: a resumed run
sees exactly the samples the straight run would.
"""

from typing import List

import datasets
import numpy as np
import torch

from core.errors import DataError
from core.tokens import IGNORE_INDEX
from data.manifest import check_tokenizer, read_manifest


def global_batch_size(micro_batch_size: int, grad_accum: int, dp_size: int) -> int:
    """Sequences per optimizer step: ``micro_batch_size`` on each of ``dp_size`` data-parallel ranks,
    ``grad_accum`` times (tensor-parallel ranks of one group share their micro-batch)."""
    return micro_batch_size * grad_accum * dp_size


def load_prepared(directory: str, tokenizer=None, *, key: str = None):
    """``(dataset, manifest)`` of a ``data.prepare`` output; refuses data of another tokenizer
    (the :class:`DataError` starts with ``key``, the config section, where given)."""
    manifest = read_manifest(directory)
    if tokenizer is not None:
        try:
            check_tokenizer(directory, manifest, tokenizer)
        except DataError as error:
            raise DataError(f"{key}: {error}" if key else str(error)) from None
    return datasets.load_from_disk(directory), manifest


class GlobalBatchSampler:
    """Yields this data-parallel rank's micro-batches (lists of dataset indices), step after step.

    Args:
        num_samples: rows in the training set.
        micro_batch_size, grad_accum, dp_size: ``global_batch_size = micro · grad_accum · dp_size``.
        dp_rank: this rank's data-parallel index (equal on the tensor-parallel ranks of a group).
        seed: shuffling seed.
        consumed_samples: where to start (a multiple of the global batch size; from a checkpoint).
    """

    def __init__(self, num_samples: int, *, micro_batch_size: int, grad_accum: int, dp_size: int, dp_rank: int,
                 seed: int, consumed_samples: int = 0):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum), ("dp_size", dp_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.num_samples, self.micro_batch_size, self.grad_accum = num_samples, micro_batch_size, grad_accum
        self.dp_size, self.dp_rank, self.seed = dp_size, dp_rank, seed
        self.global_batch_size = global_batch_size(micro_batch_size, grad_accum, dp_size)
        if num_samples < 4 * self.global_batch_size:
            # Fewer rows than that cannot give batches without repeats across epoch boundaries.
            raise DataError(f"the training set has {num_samples} rows, fewer than 4 global batches of "
                            f"{self.global_batch_size} (micro_batch_size x grad_accum x data-parallel size)")
        if consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch size "
                             f"{self.global_batch_size}")
        self.consumed_samples = consumed_samples
        self._epoch, self._order = None, None

    def _shuffled(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_samples)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order: a shuffle, adjusted so that no global batch repeats a sample.

        When the data set is not a multiple of the global batch, one batch holds the last
        ``carried`` samples of the previous epoch and the first ``head`` of this one. Samples of
        this epoch's head that are also in that previous tail swap places with the first samples
        of this epoch's middle (outside both straddling batches) that are not. The previous tail
        lies outside the previous epoch's own swaps, so it is read from its plain shuffle.
        """
        if epoch == self._epoch:
            return self._order
        order = self._shuffled(epoch)
        n, size = self.num_samples, self.global_batch_size
        carried = epoch * n % size
        if epoch > 0 and carried:
            head = size - carried
            in_previous_tail = np.isin(order, self._shuffled(epoch - 1)[n - carried:])
            clashes = np.flatnonzero(in_previous_tail[:head])
            middle = np.arange(head, n - (epoch + 1) * n % size)
            partners = middle[~in_previous_tail[middle]][:len(clashes)]
            order[clashes], order[partners] = order[partners], order[clashes].copy()
        self._epoch, self._order = epoch, order
        return order

    def stream(self, start: int, count: int) -> np.ndarray:
        """Samples at positions ``[start, start + count)`` of the endless shuffled stream."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.num_samples)
            take = min(count - filled, self.num_samples - offset)
            out[filled:filled + take] = self._permutation(epoch)[offset:offset + take]
            filled += take
        return out

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def step_micro_batches(self) -> List[List[int]]:
        """This rank's ``grad_accum`` micro-batches of the next global batch; advances the stream."""
        batch = self.stream(self.consumed_samples, self.global_batch_size)
        self.consumed_samples += self.global_batch_size
        size = self.micro_batch_size
        return [
            batch[(step * self.dp_size + self.dp_rank) * size:(step * self.dp_size + self.dp_rank + 1) * size].tolist()
            for step in range(self.grad_accum)
        ]

    def state_dict(self) -> dict:
        """What a checkpoint stores (plain types): resume with ``consumed_samples=...``."""
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size}


class Collator:
    """Rows → padded tensors: ``input_ids``, ``labels`` (``-100`` on padding) and, only where some row
    is padded, ``attention_mask``: rows of one length need none (causal attention alone is exact),
    which lets sdpa take its causal fast path instead of building a mask per layer.

    Rows without ``labels`` (text blocks) are labelled with their own ids. Labels are *not* shifted:
    position i's label is token i, as in Hugging Face causal-LM models.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows) -> dict:
        length = max((len(row["input_ids"]) for row in rows), default=0)
        # Built on the host; the job moves each batch once with :func:`to_device`.
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long, device="cpu")
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device="cpu")
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long, device="cpu")
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], device="cpu")
            labels[i, :n] = torch.as_tensor(row["labels"] if "labels" in row else row["input_ids"], device="cpu")
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if any(len(row["input_ids"]) < length for row in rows):
            batch["attention_mask"] = attention_mask
        return batch


def to_device(batch: dict, device) -> dict:
    """``batch`` (host tensors from :class:`Collator`) on ``device``, moved once.

    On CUDA the host tensors are pinned first, so the copies are asynchronous (``non_blocking``)
    and overlap with whatever the stream is still running; elsewhere it is a plain ``.to``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {name: tensor.pin_memory().to(device, non_blocking=True) for name, tensor in batch.items()}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def eval_batches(dataset, *, batch_size: int, dp_size: int, dp_rank: int, collator: Collator):
    """This rank's evaluation batches: every row exactly once over all ranks, in order.

    Batch j of rank r holds rows ``[(j·dp_size + r)·batch_size, …)``; every rank yields the same
    number of batches (sharded models need every rank in every forward), the missing rows
    replaced by copies of row 0 whose labels are all ``-100``, so they count for nothing. Metrics
    summed over ranks are therefore the same for any world size.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    rows_per_round = batch_size * dp_size
    rounds = -(-len(dataset) // rows_per_round)
    for j in range(rounds):
        start = (j * dp_size + dp_rank) * batch_size
        indices = list(range(start, min(start + batch_size, len(dataset))))
        rows = [dataset[i] for i in indices]
        filler = batch_size - len(rows)
        if filler:
            blank = dict(dataset[0])
            blank["labels"] = [IGNORE_INDEX] * len(blank["input_ids"])
            rows += [blank] * filler
        yield collator(rows)
