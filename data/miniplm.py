"""MiniPLM's difference sampling: keep the raw documents a teacher finds likelier than a small reference.

    python -m data.miniplm --input PATH [PATH ...] --tokenizer T --teacher DIR --reference DIR --seq-len L
                           --out DIR [--keep 0.5] [--device D] [--dtype float32|bfloat16]
                           [--window W] [--batch-tokens N] [--chunk-documents N] [--num-proc N]

Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models". The inputs are what
``data.prepare --format text`` takes; a document is one of its rows (a non-blank line of a .txt),
tokenized as ``data.prepare`` does (no special tokens, then EOS). Each document is scored with a
plain forward of both models (no grad) on ``EOS + document + EOS``: the leading EOS is the context a
document has in the prepared token stream, so every token ``data.prepare`` would write, its EOS
included, is predicted once. A document longer than ``--window`` (default: the smaller of the two
models' ``max_position_embeddings``) is scored in consecutive windows, each predicting the tokens
after its first. The log-softmax runs over the tokenizer's vocabulary (padded model rows excluded).

    score(document) = mean log p_teacher(token) - mean log p_reference(token)   (nats per token)

The top ``--keep`` fraction of documents by score is kept (``round(keep * documents)``, Python's rounding: halves to even; at least 1;
by documents, not weighted by their tokens, as MiniPLM samples instances; ties keep the earlier
document), written in corpus order to ``DIR/selected.jsonl`` and prepared by ``data.prepare.prepare``
into ``DIR/prepared`` (the ``data.train`` of a run), whose manifest gains a ``miniplm`` section: the
request (teacher and reference paths and fingerprints, the input files and their sha256, tokenizer,
fraction, window, dtype), counts of documents and tokens scored and kept, and each model's scoring
seconds (measured) and FLOPs (``2 * parameters * tokens``, an estimate).

Resumable: scores are written per chunk of ``--chunk-documents`` documents as atomic files in
``DIR/scores``; a restarted run scores only the missing chunks (seconds count the chunks kept).
``DIR/request.json`` records what the directory holds; another request there is refused by name.
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from core.cli import run_main
from core.errors import DataError
from core.files import sha256_of, write_atomically
from data.manifest import MANIFEST, read_manifest, tokenizer_fingerprint, tokenizer_summary
from data.prepare import load_tokenizer, prepare, tokenize_text
from data.sources import Fields, load_records

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_fingerprint(directory: str, flag: str) -> dict:
    """The path, sha256 of ``config.json`` and of the weight files of an exported Hugging Face model."""
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
        raise DataError(f"{flag}: no model at {directory} (config.json is missing)")
    weights = sorted(glob.glob(os.path.join(directory, "*.safetensors")) + glob.glob(os.path.join(directory, "*.bin")))
    if not weights:
        raise DataError(f"{flag}: {directory} holds no weights (*.safetensors or *.bin)")
    return {"path": os.path.abspath(directory), "config_sha256": sha256_of(config), "weights_sha256": sha256_of(*weights)}


def input_names(inputs, base: str = "") -> list:
    """How a request names each input: a local file by its absolute path (a relative one taken from
    ``base``, default the working directory), a hub dataset by its name."""
    return [os.path.abspath(os.path.join(base, path)) if os.path.isfile(os.path.join(base, path)) else path
            for path in inputs]


def _input_fingerprints(inputs) -> list:
    """sha256 of each local input file; a hub dataset is recorded by name only."""
    return [{"path": name, "sha256": sha256_of(name)} if os.path.isfile(name) else {"name": name}
            for name in input_names(inputs)]


def load_scorer(directory: str, flag: str, tokenizer, *, device: str, dtype: str):
    """The model of ``directory`` in eval mode on ``device``; refuses one whose vocabulary cannot hold
    the tokenizer's ids or that was saved with another tokenizer (the error names ``flag``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        own = AutoTokenizer.from_pretrained(directory)
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
            raise DataError(f"{flag}: {directory} was saved with another tokenizer (vocabulary {len(own)}) than "
                            f"{tokenizer.name_or_path!r} (vocabulary {len(tokenizer)})")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype])
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise DataError(f"{flag}: {directory} predicts {rows} tokens, fewer than the tokenizer's {len(tokenizer)} "
                        f"({tokenizer.name_or_path!r})")
    return model.to(device).eval()


def _windows(ids, window: int):
    """Pieces of at most ``window + 1`` tokens overlapping by one: each token after the first is a
    target of exactly one piece (inputs ``piece[:-1]``, targets ``piece[1:]``)."""
    return [ids[start:start + window + 1] for start in range(0, len(ids) - 1, window)]


def _batches(pieces, batch_tokens: int):
    """Indices of ``pieces``, longest first, grouped so that rows x longest row <= ``batch_tokens``."""
    order = sorted(range(len(pieces)), key=lambda index: -len(pieces[index]))
    batch = []
    for index in order:
        if batch and (len(batch) + 1) * (len(pieces[batch[0]]) - 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


@torch.no_grad()
def sum_log_probs(model, documents, *, vocab: int, window: int, batch_tokens: int, context_id: int):
    """float64 numpy array: per document (a list of token ids), the summed log-probability of its
    tokens, each predicted after ``context_id`` and the tokens before it (within its window).

    Rows are right-padded with an attention mask; the log-softmax covers the first ``vocab`` logits
    in fp32. One host sync per call (the sums are read once at the end)."""
    device = model.get_output_embeddings().weight.device
    pieces, owners = [], []
    for number, ids in enumerate(documents):
        for piece in _windows([context_id] + list(ids), window):
            pieces.append(piece)
            owners.append(number)
    sums = torch.zeros(len(documents), dtype=torch.float64, device=device)
    for batch in _batches(pieces, batch_tokens):
        width = len(pieces[batch[0]]) - 1
        rows = [pieces[index] + [context_id] * (width + 1 - len(pieces[index])) for index in batch]
        tokens = torch.tensor(rows, dtype=torch.long, device=device)  # (B, width + 1)
        mask = torch.tensor([[1] * (len(pieces[index]) - 1) + [0] * (width + 1 - len(pieces[index]))
                             for index in batch], dtype=torch.long, device=device)  # (B, width)
        logits = model(input_ids=tokens[:, :-1], attention_mask=mask, use_cache=False).logits  # (B, width, V_model)
        logits = logits[..., :vocab].float()  # the tokenizer's rows only, in fp32
        picked = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, width)
        del logits
        row_sums = (picked * mask).sum(dim=1, dtype=torch.float64)
        sums.index_add_(0, torch.tensor([owners[index] for index in batch], device=device), row_sums)
    return sums.cpu().numpy()  # host sync: once per chunk, to write its scores


def _check_request(out_dir: str, request: dict) -> None:
    """Write ``request.json`` into a fresh ``out_dir``; refuse one that holds another request."""
    path = os.path.join(out_dir, "request.json")
    if not os.path.isfile(path):
        os.makedirs(os.path.join(out_dir, "scores"), exist_ok=True)
        write_atomically(path, json.dumps(request, indent=2))
        return
    with open(path) as handle:
        held = json.load(handle)
    for key in request:
        if held.get(key) != request[key]:
            raise DataError(f"--out {out_dir} holds another selection: its {key} is {json.dumps(held.get(key))}, "
                            f"this run's is {json.dumps(request[key])} (choose another --out or remove it)")


def _chunk_path(out_dir: str, number: int) -> str:
    return os.path.join(out_dir, "scores", f"chunk-{number:06d}.json")


def _score_chunk(models, texts, tokenizer, options) -> dict:
    """Both models' summed log-probabilities, token counts and seconds for one chunk of documents."""
    documents = tokenize_text({"text": texts}, tokenizer)["input_ids"]
    record = {"tokens": [len(ids) for ids in documents]}
    for name, model in models.items():
        start = time.perf_counter()
        sums = sum_log_probs(model, documents, vocab=len(tokenizer), context_id=tokenizer.eos_token_id, **options)
        record[name] = {"sums": sums.tolist(), "seconds": time.perf_counter() - start}
    return record


def score_corpus(records, tokenizer, models, out_dir: str, *, chunk_documents: int, **options) -> list:
    """Score every document of ``records`` (a ``text`` dataset) in chunks, reusing the chunks already
    in ``out_dir/scores``; returns the chunk records in order."""
    starts = range(0, len(records), chunk_documents)
    done = [number for number in range(len(starts)) if os.path.isfile(_chunk_path(out_dir, number))]
    progress = tqdm(total=len(records), initial=sum(min(chunk_documents, len(records) - starts[n]) for n in done),
                    desc="scoring documents", unit="doc")
    chunks = []
    with progress:
        for number, start in enumerate(starts):
            path = _chunk_path(out_dir, number)
            if not os.path.isfile(path):
                texts = records[start:start + chunk_documents]["text"]
                write_atomically(path, json.dumps(_score_chunk(models, texts, tokenizer, options)))
                progress.update(len(texts))
            with open(path) as handle:
                chunks.append(json.load(handle))
    return chunks


def select(teacher_sums, reference_sums, tokens, keep: float) -> np.ndarray:
    """Indices (ascending) of the ``round(keep * n)`` documents (at least 1) with the largest
    ``teacher_sums / tokens - reference_sums / tokens``; ties keep the earlier document."""
    scores = (np.asarray(teacher_sums) - np.asarray(reference_sums)) / np.asarray(tokens)
    count = max(1, int(round(keep * len(scores))))
    return np.sort(np.argsort(-scores, kind="stable")[:count])


def _cost(chunks, name: str, parameters: int, tokens: int) -> dict:
    return {"seconds": sum(chunk[name]["seconds"] for chunk in chunks), "parameters": parameters, "tokens": tokens,
            "flops_estimate": 2 * parameters * tokens}


def _column(chunks, key: str) -> np.ndarray:
    """One column of the chunk records, over the whole corpus: ``tokens`` or a model's ``sums``."""
    return np.concatenate([chunk[key] if key == "tokens" else chunk[key]["sums"] for chunk in chunks])


def _provenance(request, chunks, kept, models, device) -> dict:
    """The prepared manifest's ``miniplm`` section."""
    tokens = _column(chunks, "tokens")
    scores = (_column(chunks, "teacher") - _column(chunks, "reference")) / tokens
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    return {
        "request": request,
        "score": "mean log p_teacher - mean log p_reference per token (nats), on EOS + document + EOS",
        "selection": "top keep fraction of documents by score, not weighted by tokens",
        "counts": {"documents": len(tokens), "documents_kept": len(kept), "tokens": int(tokens.sum()),
                   "tokens_kept": int(tokens[kept].sum())},
        "scores": {"kept_min": float(scores[kept].min()), "mean": float(scores.mean()),
                   "kept_mean": float(scores[kept].mean())},
        "cost": {"device": device, **{name: _cost(chunks, name, parameters[name], int(tokens.sum()))
                                      for name in ("teacher", "reference")},
                 "note": "seconds measured (chunks kept across restarts); flops_estimate = 2 * parameters * tokens"},
    }


def _validate(keep: float, seq_len: int, window, dtype: str, chunk_documents: int) -> None:
    """Refuse flags out of range before anything is loaded."""
    if not 0 < keep <= 1:
        raise DataError(f"--keep must be in (0, 1], got {keep}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2 (one input and one target token), got {seq_len}")
    if window is not None and window < 1:
        raise DataError(f"--window must be >= 1, got {window}")
    if chunk_documents < 1:
        raise DataError(f"--chunk-documents must be >= 1, got {chunk_documents}")
    if dtype not in DTYPES:
        raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _window(models, window, batch_tokens: int) -> int:
    """``window``, else the models' smaller context; one window must fit in ``batch_tokens``."""
    if window is None:
        lengths = [getattr(model.config, "max_position_embeddings", None) for model in models.values()]
        if None in lengths:
            raise DataError("--window is needed: a model's config has no max_position_embeddings")
        window = min(lengths)
    if batch_tokens < window:
        raise DataError(f"--batch-tokens ({batch_tokens}) must hold one window of {window} tokens (--window)")
    return window


def miniplm(inputs, tokenizer_name: str, teacher: str, reference: str, out_dir: str, *, seq_len: int,
            keep: float = 0.5, device: str = "cpu", dtype: str = "float32", window: int = None,
            batch_tokens: int = 8192, chunk_documents: int = 1024, num_proc: int = 1) -> dict:
    """Score, select and prepare (see the module docstring); returns the ``miniplm`` manifest section.
    A finished ``out_dir`` of the same request is returned as it is."""
    _validate(keep, seq_len, window, dtype, chunk_documents)
    tokenizer = load_tokenizer(tokenizer_name)
    fingerprints = {"teacher": model_fingerprint(teacher, "--teacher"),
                    "reference": model_fingerprint(reference, "--reference")}
    records = load_records(inputs, "text", Fields(), tokenizer)
    models = {"teacher": load_scorer(teacher, "--teacher", tokenizer, device=device, dtype=dtype),
              "reference": load_scorer(reference, "--reference", tokenizer, device=device, dtype=dtype)}
    request = {"inputs": _input_fingerprints(inputs), "tokenizer": tokenizer_summary(tokenizer)["fingerprint"],
               **fingerprints, "keep": keep, "seq_len": seq_len, "window": _window(models, window, batch_tokens),
               "dtype": dtype, "chunk_documents": chunk_documents}
    _check_request(out_dir, request)
    prepared = os.path.join(out_dir, "prepared")
    if os.path.isfile(os.path.join(prepared, MANIFEST)) and read_manifest(prepared).get("miniplm", {}).get(
            "request") == request:
        return read_manifest(prepared)["miniplm"]
    chunks = score_corpus(records, tokenizer, models, out_dir, chunk_documents=chunk_documents,
                          window=request["window"], batch_tokens=batch_tokens)
    kept = select(_column(chunks, "teacher"), _column(chunks, "reference"), _column(chunks, "tokens"), keep)
    # JSONL, not lines of text: a document from a JSONL or parquet input may hold newlines.
    selected = os.path.join(out_dir, "selected.jsonl")
    write_atomically(selected, "".join(json.dumps({"text": text}) + "\n" for text in records.select(kept)["text"]))
    prepare(tokenizer_name, [selected], prepared, fmt="text", seq_len=seq_len, num_proc=num_proc)
    section = _provenance(request, chunks, kept, models, device)
    manifest = read_manifest(prepared)
    write_atomically(os.path.join(prepared, MANIFEST), json.dumps({**manifest, "miniplm": section}, indent=2))
    return section


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.miniplm", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="raw text inputs, as data.prepare --format text")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory or hub name")
    parser.add_argument("--teacher", required=True, help="exported teacher model directory")
    parser.add_argument("--reference", required=True, help="exported reference model directory (a small model "
                        "trained on a slice of the corpus)")
    parser.add_argument("--seq-len", type=int, required=True, help="block length of the prepared selection")
    parser.add_argument("--out", required=True, help="output directory (scores/, selected.jsonl, prepared/)")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of documents kept (default 0.5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to score on (default cuda where available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model weights' dtype")
    parser.add_argument("--window", type=int, default=None, help="tokens per scored window (default: the models' "
                        "smaller max_position_embeddings)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="rows x padded length per forward "
                        "(default 8192; the logits and their log-softmax hold about 8 x batch_tokens x vocabulary "
                        "bytes)")
    parser.add_argument("--chunk-documents", type=int, default=1024, help="documents per resumable score file")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenization processes of the prepare step")
    args = parser.parse_args(argv)
    section = miniplm(args.input, args.tokenizer, args.teacher, args.reference, args.out, seq_len=args.seq_len,
                      keep=args.keep, device=args.device, dtype=args.dtype, window=args.window,
                      batch_tokens=args.batch_tokens, chunk_documents=args.chunk_documents, num_proc=args.num_proc)
    counts, cost = section["counts"], section["cost"]
    print(f"selected {counts['documents_kept']} of {counts['documents']} documents ({counts['tokens_kept']} of "
          f"{counts['tokens']} tokens) into {os.path.join(args.out, 'prepared')}; scoring took "
          f"{cost['teacher']['seconds']:.1f} s (teacher) + {cost['reference']['seconds']:.1f} s (reference)")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
