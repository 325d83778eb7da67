"""How often each token id occurs in prepared data: ``token_counts.npy`` beside the rows.

``data.prepare`` writes the file and records it in the manifest (``token_counts``: file, counted
column, total). Counted are the tokens training predicts: every token of the blocks for ``text``
(column ``input_ids``; prepared blocks hold no padding, the collator pads later), the trained tokens
for ``sft`` (column ``labels``, the -100 prompt positions left out). ``eval.evaluate`` splits the
vocabulary into frequency bands by these counts.
"""

import os
import sys

import numpy as np

from core.errors import DataError
from core.tokens import IGNORE_INDEX

TOKEN_COUNTS = "token_counts.npy"
COUNTED_COLUMN = {"text": "input_ids", "sft": "labels"}
"""The column whose tokens are counted, per ``data.prepare`` format."""


def count_tokens(dataset, column: str, vocab_size: int) -> np.ndarray:
    """``[max(vocab_size, largest id + 1)]`` int64 occurrences of each id in ``dataset[column]``
    (:data:`core.tokens.IGNORE_INDEX` left out). Reads Arrow buffers, a batch of rows at a time."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
        ids = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in table[column].chunks]
        ids = np.concatenate(ids).astype(np.int64) if ids else np.empty(0, dtype=np.int64)
        ids = ids[ids != IGNORE_INDEX]
        if ids.size and ids.min() < 0:
            raise DataError(f"{column}: negative token id {int(ids.min())}")
        found = np.bincount(ids, minlength=counts.size)
        if found.size > counts.size:
            counts = np.pad(counts, (0, found.size - counts.size))
        counts += found
    return counts


def write_token_counts(directory: str, counts: np.ndarray, column: str) -> dict:
    """Write ``counts`` into ``directory``; the manifest's ``token_counts`` record."""
    np.save(os.path.join(directory, TOKEN_COUNTS), counts.astype(np.int64))
    return {"file": TOKEN_COUNTS, "column": column, "total": int(counts.sum())}


def read_token_counts(directory: str, manifest: dict) -> np.ndarray:
    """The counts of the prepared data in ``directory`` (its ``manifest``, already read).

    Data prepared before the file existed is counted now, from its rows (the same counts
    ``data.prepare`` would write; a note says so and how to store them). A file that is not a 1-D
    array of non-negative integers is refused by name."""
    path = os.path.join(directory, TOKEN_COUNTS)
    if not os.path.isfile(path):
        import datasets

        column = COUNTED_COLUMN.get(manifest.get("format"))
        if column is None:
            raise DataError(f"{directory}: manifest format {manifest.get('format')!r} is not one data.prepare writes")
        print(f"note: {directory} has no {TOKEN_COUNTS} (prepared before it existed); counting its {column} now. "
              f"Prepare it again with python -m data.prepare to store them.", file=sys.stderr)
        return count_tokens(datasets.load_from_disk(directory), column, manifest["tokenizer"]["vocab_size"])
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a token count array ({error}); prepare {directory} again") from None
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise DataError(f"{path}: expected a 1-D array of non-negative integer counts, got {counts.dtype} "
                        f"{tuple(counts.shape)}; prepare {directory} again")
    return counts.astype(np.int64)
