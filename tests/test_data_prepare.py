"""Demo data, tokenizer training and data.prepare, checked against independent counts."""

import collections
import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest

from core.cli import run_main
from core.errors import DataError
from data.loader import load_prepared
from data.prepare import main as prepare_main
from data.prepare import prepare
from data.synthetic import generate
from data.token_counts import TOKEN_COUNTS, read_token_counts
from data.tokenizer import main as tokenizer_main


def _lines(path):
    with open(path, encoding="utf-8") as lines:
        return [line.rstrip("\n") for line in lines]


def test_demo_data_is_deterministic_and_sized(demo_dir, tmp_path):
    again = tmp_path / "again"
    generate(str(again), seed=3, megabytes=0.3, sft_examples=300)
    for relative in ("pretrain/train.txt", "pretrain/eval.txt", "sft/train.jsonl", "sft/eval.jsonl"):
        assert (demo_dir / relative).read_bytes() == (again / relative).read_bytes()
    other = tmp_path / "other"
    generate(str(other), seed=4, megabytes=0.3, sft_examples=300)
    assert (other / "pretrain/train.txt").read_bytes() != (demo_dir / "pretrain/train.txt").read_bytes()
    size = sum(os.path.getsize(demo_dir / f"pretrain/{split}.txt") for split in ("train", "eval"))
    assert 0.3e6 <= size < 0.31e6
    assert len(_lines(demo_dir / "sft/train.jsonl")) + len(_lines(demo_dir / "sft/eval.jsonl")) == 300


def test_word_problems_are_worked_correctly(demo_dir):
    """Every step 'a op b = c' is right and the '#### n' line repeats the last result."""
    for line in _lines(demo_dir / "sft/train.jsonl"):
        example = json.loads(line)
        assert set(example) == {"prompt", "response"} and example["prompt"].endswith("?")
        *steps, final = example["response"].split("\n")
        assert re.fullmatch(r"#### -?\d+", final)
        results = []
        for step in steps:
            for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", step):
                a, b = int(a), int(b)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op] == int(c), step
                results.append(int(c))
        assert results and results[-1] == int(final[5:])


def test_tokenizer_round_trip(tokenizer, demo_dir):
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)
    for text in _lines(demo_dir / "pretrain/eval.txt")[:20] + ["Unseen: ünïcode ✓ 12345"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert "1234" not in tokenizer.convert_ids_to_tokens(tokenizer("1234", add_special_tokens=False)["input_ids"])


def _independent_stream(tokenizer, paths):
    stream, documents = [], 0
    for path in paths:
        for line in _lines(path):
            if line.strip():
                stream += tokenizer.encode(line, add_special_tokens=False) + [tokenizer.eos_token_id]
                documents += 1
    return stream, documents


@pytest.mark.parametrize("num_proc", [1, 2])
def test_text_blocks_account_for_every_token(tokenizer_dir, tokenizer, demo_dir, tmp_path, num_proc):
    inputs = [str(demo_dir / "pretrain/eval.txt"), str(demo_dir / "pretrain/train.txt")]
    counts = prepare(str(tokenizer_dir), inputs, str(tmp_path / "out"), fmt="text", seq_len=96, num_proc=num_proc)
    stream, documents = _independent_stream(tokenizer, inputs)
    blocks, manifest = load_prepared(str(tmp_path / "out"), tokenizer)
    assert counts == manifest["counts"]
    assert counts["documents"] == documents and counts["tokens"] == len(stream)
    assert counts["blocks"] == len(stream) // 96 == len(blocks)
    assert counts["dropped_tokens"] == len(stream) % 96
    flat = [token for block in blocks["input_ids"] for token in block]
    assert flat == stream[:len(flat)]  # nothing lost, duplicated or reordered
    assert all(len(block) == 96 for block in blocks["input_ids"])
    _assert_counts_are(tmp_path / "out", manifest, collections.Counter(flat), len(tokenizer), "input_ids")


def _assert_counts_are(directory, manifest, expected: collections.Counter, vocab_size, column):
    """The stored token counts equal ``expected`` and the manifest records them; data without the
    file (prepared before it existed) is counted alike on reading."""
    counts = np.load(directory / TOKEN_COUNTS)
    assert counts.shape == (vocab_size,) and counts.dtype == np.int64
    assert {token: int(n) for token, n in enumerate(counts) if n} == dict(expected)
    assert manifest["token_counts"] == {"file": TOKEN_COUNTS, "column": column, "total": sum(expected.values())}
    os.remove(directory / TOKEN_COUNTS)
    np.testing.assert_array_equal(read_token_counts(str(directory), manifest), counts)
    np.save(directory / TOKEN_COUNTS, -counts)
    with pytest.raises(DataError, match=f"{TOKEN_COUNTS}: expected a 1-D array of non-negative integer counts"):
        read_token_counts(str(directory), manifest)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_sft_labels_cover_exactly_response_and_eos(tokenizer_dir, tokenizer, demo_dir, tmp_path):
    path = str(demo_dir / "sft/eval.jsonl")
    counts = prepare(str(tokenizer_dir), [path], str(tmp_path / "out"), fmt="sft", seq_len=512)
    rows, manifest = load_prepared(str(tmp_path / "out"))
    examples = [json.loads(line) for line in _lines(path)]
    assert counts["examples"] == len(rows) == len(examples) and counts["truncated"] == counts["dropped"] == 0
    trained = collections.Counter()
    for row, example in zip(rows, examples):
        prompt = tokenizer.encode(example["prompt"], add_special_tokens=False)
        response = tokenizer.encode(example["response"], add_special_tokens=False) + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + response
        assert row["labels"] == [-100] * len(prompt) + response
        trained.update(response)
    _assert_counts_are(tmp_path / "out", manifest, trained, len(tokenizer), "labels")  # the prompts are not trained


def test_sft_truncates_prompts_from_the_left_or_drops(tokenizer_dir, tokenizer, tmp_path):
    rows = [{"prompt": "one two three four five six seven eight nine ten", "response": "ok"},
            {"prompt": "x", "response": "ok"},
            {"prompt": "x", "response": "a response far longer than the sequence length allows " * 4}]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    response = tokenizer.encode("ok", add_special_tokens=False) + [tokenizer.eos_token_id]
    seq_len = len(response) + 3
    counts = prepare(str(tokenizer_dir), [path], str(tmp_path / "cut"), fmt="sft", seq_len=seq_len)
    assert (counts["truncated"], counts["dropped"], counts["examples"]) == (1, 1, 2)
    cut, _ = load_prepared(str(tmp_path / "cut"))
    prompt = tokenizer.encode(rows[0]["prompt"], add_special_tokens=False)
    assert cut[0]["input_ids"] == prompt[-3:] + response
    assert cut[0]["labels"] == [-100] * 3 + response
    counts = prepare(str(tokenizer_dir), [path], str(tmp_path / "drop"), fmt="sft", seq_len=seq_len, drop_long=True)
    assert (counts["truncated"], counts["dropped"], counts["examples"]) == (0, 2, 1)


def test_packing_keeps_examples_whole_and_in_order(tokenizer_dir, demo_dir, tmp_path):
    path = str(demo_dir / "sft/eval.jsonl")
    prepare(str(tokenizer_dir), [path], str(tmp_path / "one"), fmt="sft", seq_len=256)
    counts = prepare(str(tokenizer_dir), [path], str(tmp_path / "packed"), fmt="sft", seq_len=256, pack=True)
    single, _ = load_prepared(str(tmp_path / "one"))
    packed, _ = load_prepared(str(tmp_path / "packed"))
    assert counts["rows"] == len(packed) < len(single)
    assert all(len(row) <= 256 for row in packed["input_ids"])
    assert [t for row in packed["input_ids"] for t in row] == [t for row in single["input_ids"] for t in row]
    assert [t for row in packed["labels"] for t in row] == [t for row in single["labels"] for t in row]
    # Rows start at example boundaries: each packed row begins with the start of some example.
    starts = {tuple(row[:5]) for row in single["input_ids"]}
    assert all(tuple(row[:5]) in starts for row in packed["input_ids"])


def test_chat_messages_use_the_chat_template(tokenizer_dir, tokenizer, tmp_path):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    prepare(str(tokenizer_dir), [path], str(tmp_path / "out"), fmt="sft", seq_len=256)
    rows, _ = load_prepared(str(tmp_path / "out"))
    rendered = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n"
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    response = tokenizer.encode("2 + 3 = 5\n#### 5", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert rows[0]["input_ids"] == prompt + response and rows[0]["labels"] == [-100] * len(prompt) + response


def test_parquet_and_custom_fields(tokenizer_dir, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    jsonl = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": r["question"], "response": r["answer"]} for r in rows])
    assert run_main(prepare_main, ["--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "rows.parquet"),
                                  "--format", "sft", "--seq-len", "64", "--out", str(tmp_path / "pq"),
                                  "--prompt-field", "question", "--response-field", "answer"]) == 0
    prepare(str(tokenizer_dir), [jsonl], str(tmp_path / "js"), fmt="sft", seq_len=64)
    assert load_prepared(str(tmp_path / "pq"))[0].to_list() == load_prepared(str(tmp_path / "js"))[0].to_list()


# --- bad input: one line naming the file, line and field; exit 2; nothing half-written -------------


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, named", [
    ("missing file", "input file not found: {tmp}/nope.jsonl"),
    ("empty file", "input file is empty: {tmp}/empty.jsonl"),
    ("not json", "{tmp}/bad.jsonl:2: not valid JSON"),
    ("missing field", "{tmp}/nofield.jsonl:1: missing field 'response'"),
    ("seq_len 1", "--seq-len must be >= 2"),
    ("no eos", "has no EOS token"),
    ("missing tokenizer", "could not load tokenizer '{tmp}/no-tokenizer'"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, named, tokenizer_dir, tokenizer, tmp_path, capsys):
    tmp = str(tmp_path)
    inputs = {
        "missing file": f"{tmp}/nope.jsonl",
        "empty file": _bad(tmp_path, "empty.jsonl", ""),
        "not json": _bad(tmp_path, "bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n'),
        "missing field": _bad(tmp_path, "nofield.jsonl", '{"prompt": "a"}\n'),
    }.get(case, _bad(tmp_path, "ok.jsonl", '{"prompt": "a", "response": "b"}\n'))
    tokenizer_path = str(tokenizer_dir)
    if case == "no eos":
        tokenizer_path = f"{tmp}/no-eos"
        no_eos = type(tokenizer).from_pretrained(str(tokenizer_dir), eos_token=None)
        no_eos.save_pretrained(tokenizer_path)
    if case == "missing tokenizer":
        tokenizer_path = f"{tmp}/no-tokenizer"
    out = tmp_path / "out"
    argv = ["--tokenizer", tokenizer_path, "--input", inputs, "--format", "sft", "--out", str(out), "--seq-len",
            "1" if case == "seq_len 1" else "32"]
    assert run_main(prepare_main, argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert named.format(tmp=tmp) in error
    assert not out.exists() and not [p for p in os.listdir(tmp) if p.startswith(".")]  # no staging left


def test_failed_run_keeps_the_previous_output(tokenizer_dir, demo_dir, tmp_path):
    out = tmp_path / "out"
    prepare(str(tokenizer_dir), [str(demo_dir / "sft/eval.jsonl")], str(out), fmt="sft", seq_len=128)
    before = sorted(os.listdir(out))
    with pytest.raises(DataError):
        prepare(str(tokenizer_dir), [_bad(tmp_path, "bad.jsonl", "{")], str(out), fmt="sft", seq_len=128)
    assert sorted(os.listdir(out)) == before


def test_data_of_another_tokenizer_is_refused(tokenizer_dir, demo_dir, tmp_path):
    prepare(str(tokenizer_dir), [str(demo_dir / "sft/eval.jsonl")], str(tmp_path / "out"), fmt="sft", seq_len=128)
    assert run_main(tokenizer_main, ["--input", str(demo_dir / "pretrain/eval.txt"), "--vocab-size", "400", "--out",
                                    str(tmp_path / "other")]) == 0
    from transformers import AutoTokenizer

    with pytest.raises(DataError, match="was prepared with tokenizer .* prepare it again"):
        load_prepared(str(tmp_path / "out"), AutoTokenizer.from_pretrained(str(tmp_path / "other")))


def test_command_line_exit_code_and_no_traceback(tmp_path):
    """The real entry point: exit code 2 and a single stderr line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "data.tokenizer", "--input", str(tmp_path / "missing.txt"),
                             "--vocab-size", "100", "--out", str(tmp_path / "tok")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: input file not found: {tmp_path}/missing.txt"
