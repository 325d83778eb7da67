"""Read raw inputs (.txt, .jsonl, .parquet or a datasets hub name) into one ``datasets.Dataset``.

Text data comes out with a ``text`` column, SFT data with ``prompt`` and ``response``; rows keep
input order (files in the order given, lines in file order). Problems are reported as
:class:`core.errors.DataError` naming the file, line and field.
"""

import json
import os
from dataclasses import dataclass

import datasets

from core.errors import DataError


def require_files(paths, what="input") -> None:
    """Every path must be an existing, non-empty file."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{what} file not found: {path}")
        if os.path.getsize(path) == 0:
            raise DataError(f"{what} file is empty: {path}")


@dataclass(frozen=True)
class Fields:
    """Column names to read from JSONL/parquet/hub inputs."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


def _is_local(path: str) -> bool:
    return os.path.exists(path) or path.endswith((".txt", ".jsonl", ".json", ".parquet")) or os.sep in path


def _jsonl_columns(path: str, fmt: str, fields: Fields) -> list:
    """Check every line of a JSONL file and return the columns the format will read from it."""
    wanted = None
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            columns = _columns_for(row.keys(), fmt, fields, f"{path}:{number}")
            wanted = wanted or columns
            if columns != wanted:
                raise DataError(f"{path}:{number}: has fields {columns}, earlier lines have {wanted}")
            for column in columns:
                _check_value(row[column], column, fields, f"{path}:{number}")
    if wanted is None:
        raise DataError(f"input file has no rows: {path}")
    return wanted


def _columns_for(available, fmt: str, fields: Fields, where: str) -> list:
    available = set(available)
    if fmt == "text":
        if fields.text not in available:
            raise DataError(f"{where}: missing field {fields.text!r} (set --text-field)")
        return [fields.text]
    if fields.prompt in available and fields.response in available:
        return [fields.prompt, fields.response]
    if fields.messages in available:
        return [fields.messages]
    missing = fields.response if fields.prompt in available else fields.prompt
    raise DataError(f"{where}: missing field {missing!r} (SFT rows need {fields.prompt!r} and {fields.response!r}, "
                    f"or {fields.messages!r}; set --prompt-field/--response-field/--messages-field)")


def _check_value(value, column: str, fields: Fields, where: str) -> None:
    if column != fields.messages:
        if not isinstance(value, str):
            raise DataError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
        return
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: field {column!r} must be a non-empty list of {{'role', 'content'}} strings")
    if value[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {column!r} must end with an assistant message (the response)")


def _load_one(path: str, fmt: str, fields: Fields, split: str) -> datasets.Dataset:
    if not _is_local(path):
        try:
            dataset = datasets.load_dataset(path, split=split)
        except Exception as error:  # the hub raises many types; the user needs the reason
            raise DataError(f"could not load dataset {path!r} (split {split!r}) from the hub: {error}") from None
        columns = _columns_for(dataset.column_names, fmt, fields, f"dataset {path}")
        return dataset.select_columns(columns)
    require_files([path])
    if path.endswith(".txt"):
        if fmt != "text":
            raise DataError(f"{path}: SFT data must be .jsonl or .parquet with prompt/response or messages")
        dataset = datasets.load_dataset("text", data_files=path, split="train")
        # A blank line is not a document.
        return dataset.filter(lambda row: bool(row["text"].strip()), desc=f"skipping blank lines of {path}")
    if path.endswith((".jsonl", ".json")):
        columns = _jsonl_columns(path, fmt, fields)
        return datasets.load_dataset("json", data_files=path, split="train").select_columns(columns)
    if path.endswith(".parquet"):
        dataset = datasets.load_dataset("parquet", data_files=path, split="train")
        return dataset.select_columns(_columns_for(dataset.column_names, fmt, fields, path))
    raise DataError(f"{path}: unsupported input type (expected .txt, .jsonl, .parquet or a hub dataset name)")


def _render_chat(dataset: datasets.Dataset, column: str, tokenizer, where: str) -> datasets.Dataset:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: field {column!r} holds chat messages but tokenizer {tokenizer.name_or_path!r} "
                        f"has no chat template")

    def render(row):
        messages = row[column]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        return {"prompt": prompt, "response": messages[-1]["content"]}

    return dataset.map(render, remove_columns=[column], desc=f"rendering chat messages of {where}")


def load_records(inputs, fmt: str, fields: Fields, tokenizer, *, split: str = "train") -> datasets.Dataset:
    """All ``inputs`` as one dataset in input order: a ``text`` column, or ``prompt``/``response``."""
    parts = []
    for path in inputs:
        dataset = _load_one(path, fmt, fields, split)
        if fmt == "text":
            dataset = dataset.rename_column(fields.text, "text") if fields.text != "text" else dataset
        elif fields.messages in dataset.column_names and fields.prompt not in dataset.column_names:
            dataset = _render_chat(dataset, fields.messages, tokenizer, path)
        else:
            dataset = dataset.rename_columns({
                old: new for old, new in ((fields.prompt, "prompt"), (fields.response, "response")) if old != new
            })
        parts.append(dataset)
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
