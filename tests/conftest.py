"""Shared fixtures: a small demo corpus and a tokenizer trained on it, built once per session."""

import pytest

from data.synthetic import generate
from data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    generate(str(out), seed=3, megabytes=0.3, sft_examples=300)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    train_tokenizer([str(demo_dir / "pretrain/train.txt"), str(demo_dir / "sft/train.jsonl")], str(out),
                    vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
