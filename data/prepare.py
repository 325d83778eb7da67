"""Tokenize raw data into fixed blocks (text) or labelled rows (SFT) for training.

    python -m data.prepare --tokenizer T --input PATH [PATH ...] --format text|sft --seq-len L
                           --out DIR [--num-proc N] [--pack] [--drop-long]

``text``: every document is tokenized without special tokens and followed by EOS; documents are
concatenated in input order and cut into blocks of exactly L tokens (column ``input_ids``); only the
final partial block is dropped (and counted).
``sft``: one row per example, ``input_ids`` = prompt + response + EOS (no padding) and ``labels`` =
-100 on the prompt, the token itself on response and EOS. An example longer than L loses prompt
tokens from the left (or is dropped with ``--drop-long``); one whose response alone exceeds L is
dropped. ``--pack`` fills rows of at most L tokens with whole examples, in order.

DIR is written atomically and loads with ``datasets.load_from_disk(DIR)``; ``DIR/manifest.json``
records the tokenizer (name and vocabulary fingerprint), format, seq_len and counts.
``DIR/token_counts.npy`` holds each token id's occurrences over the prepared rows (every block token
for ``text``, the trained ``labels`` tokens for ``sft``; :mod:`data.token_counts`).
"""

import argparse
import hashlib
import os
import tempfile

import datasets
import numpy as np

from core.cli import run_main
from core.errors import DataError
from core.files import atomic_directory
from core.tokens import IGNORE_INDEX
from data.manifest import tokenizer_summary, write_manifest
from data.sources import Fields, load_records
from data.token_counts import COUNTED_COLUMN, count_tokens, write_token_counts


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer by directory or hub name; it must have an EOS token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:  # OSError, ValueError, hub errors: all mean "cannot use this tokenizer"
        raise DataError(f"could not load tokenizer {name_or_path!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token; documents need one to be separated")
    return tokenizer


def tokenize_text(batch, tokenizer):
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [row + [tokenizer.eos_token_id] for row in ids]}


def _tokenize_sft(batch, tokenizer, seq_len, drop_long):
    prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
    responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "labels": [], "truncated": [], "dropped": []}
    for prompt, response in zip(prompts, responses):
        response = response + [tokenizer.eos_token_id]
        room = seq_len - len(response)
        too_long = len(prompt) > room
        dropped = room < 0 or (too_long and drop_long)
        if too_long and not dropped:
            prompt = prompt[len(prompt) - room:]  # keep the end of the prompt, next to the response
        out["input_ids"].append([] if dropped else prompt + response)
        out["labels"].append([] if dropped else [IGNORE_INDEX] * len(prompt) + response)
        out["truncated"].append(too_long and not dropped)
        out["dropped"].append(dropped)
    return out


def _text_blocks(tokenized: datasets.Dataset, seq_len: int):
    """Cut the concatenated token stream into blocks of ``seq_len``, in order; drop the remainder."""
    carry = np.empty(0, dtype=np.int64)
    for batch in tokenized.iter(batch_size=1000):
        stream = np.concatenate([carry] + [np.asarray(row, dtype=np.int64) for row in batch["input_ids"]])
        full = len(stream) // seq_len * seq_len
        for start in range(0, full, seq_len):
            yield {"input_ids": stream[start:start + seq_len].tolist()}
        carry = stream[full:]


def _packed_rows(tokenized: datasets.Dataset, seq_len: int):
    """Whole examples, in order, into rows of at most ``seq_len`` tokens."""
    ids, labels = [], []
    for batch in tokenized.iter(batch_size=1000):
        for row_ids, row_labels in zip(batch["input_ids"], batch["labels"]):
            if len(ids) + len(row_ids) > seq_len:
                yield {"input_ids": ids, "labels": labels}
                ids, labels = [], []
            ids, labels = ids + row_ids, labels + row_labels
    if ids:
        yield {"input_ids": ids, "labels": labels}


def _check_arguments(fmt: str, seq_len: int, num_proc: int, pack: bool) -> None:
    if fmt not in ("text", "sft"):
        raise DataError(f"--format must be 'text' or 'sft', got {fmt!r}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2 (one input and one target token), got {seq_len}")
    if num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {num_proc}")
    if pack and fmt != "sft":
        raise DataError("--pack applies to --format sft (text is always cut into full blocks)")


def prepare(tokenizer_name: str, inputs, out_dir: str, *, fmt: str, seq_len: int, num_proc: int = 1,
            pack: bool = False, drop_long: bool = False, fields: Fields = Fields(), split: str = "train") -> dict:
    """Prepare ``inputs`` into ``out_dir`` (atomically); returns the manifest's counts."""
    _check_arguments(fmt, seq_len, num_proc, pack)
    tokenizer = load_tokenizer(tokenizer_name)
    records = load_records(inputs, fmt, fields, tokenizer, split=split)
    num_proc = min(num_proc, max(1, len(records)))
    if fmt == "text":
        tokenized = records.map(tokenize_text, batched=True, num_proc=num_proc, remove_columns=records.column_names,
                                fn_kwargs={"tokenizer": tokenizer}, desc="tokenizing")
    else:
        tokenized = records.map(_tokenize_sft, batched=True, num_proc=num_proc, remove_columns=records.column_names,
                                fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "drop_long": drop_long},
                                desc="tokenizing")
    lengths = np.fromiter((len(row) for row in tokenized["input_ids"]), dtype=np.int64, count=len(tokenized))
    counts = {"documents": len(records), "tokens": int(lengths.sum())}

    # Generated datasets are written to a scratch cache beside the output, then saved into it.
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(dir=parent, prefix=".prepare-cache-")
    with scratch as cache, atomic_directory(out_dir) as staging:
        fingerprint = hashlib.sha256(f"{tokenized._fingerprint}-{fmt}-{seq_len}-{pack}".encode()).hexdigest()[:16]
        if fmt == "text":
            features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
            prepared = datasets.Dataset.from_generator(_text_blocks, features=features, cache_dir=cache,
                                                       gen_kwargs={"tokenized": tokenized, "seq_len": seq_len},
                                                       fingerprint=fingerprint)
            counts.update(blocks=len(prepared), dropped_tokens=counts["tokens"] - len(prepared) * seq_len)
        else:
            flags = tokenized.select_columns(["truncated", "dropped"])
            counts.update(truncated=int(np.sum(flags["truncated"])), dropped=int(np.sum(flags["dropped"])))
            kept = tokenized.filter(lambda row: not row["dropped"], desc="dropping over-long examples")
            kept = kept.select_columns(["input_ids", "labels"])
            features = datasets.Features({
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "labels": datasets.Sequence(datasets.Value("int32")),
            })
            if pack:
                prepared = datasets.Dataset.from_generator(_packed_rows, features=features, cache_dir=cache,
                                                           gen_kwargs={"tokenized": kept, "seq_len": seq_len},
                                                           fingerprint=fingerprint)
            else:
                prepared = kept.cast(features)
            counts.update(examples=len(kept), rows=len(prepared))
        prepared.save_to_disk(staging)
        column = COUNTED_COLUMN[fmt]
        token_counts = write_token_counts(staging, count_tokens(prepared, column, len(tokenizer)), column)
        write_manifest(staging, {
            "created_by": "data.prepare",
            "format": fmt,
            "seq_len": seq_len,
            "packed": pack,
            "inputs": list(inputs),
            "tokenizer": tokenizer_summary(tokenizer),
            "counts": counts,
            "token_counts": token_counts,
        })
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory or hub name")
    parser.add_argument("--input", nargs="+", required=True, help=".txt, .jsonl, .parquet files or hub dataset names")
    parser.add_argument("--format", choices=["text", "sft"], required=True)
    parser.add_argument("--seq-len", type=int, required=True, help="block length (text) or maximum row length (sft)")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenization processes (default 1)")
    parser.add_argument("--pack", action="store_true", help="sft: pack whole examples into rows of <= seq_len")
    parser.add_argument("--drop-long", action="store_true", help="sft: drop over-long examples instead of "
                        "truncating their prompt from the left")
    parser.add_argument("--split", default="train", help="split to read from hub datasets (default train)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--messages-field", default="messages")
    args = parser.parse_args(argv)
    fields = Fields(text=args.text_field, prompt=args.prompt_field, response=args.response_field,
                    messages=args.messages_field)
    counts = prepare(args.tokenizer, args.input, args.out, fmt=args.format, seq_len=args.seq_len,
                     num_proc=args.num_proc, pack=args.pack, drop_long=args.drop_long, fields=fields, split=args.split)
    print(f"prepared {args.out}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
