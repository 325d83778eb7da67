"""The manifest written beside prepared data, and the tokenizer fingerprint it records."""

import hashlib
import json
import os

from core.errors import DataError

MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the token → id map and the special-token ids: equal iff two tokenizers encode alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()


def tokenizer_summary(tokenizer) -> dict:
    return {
        "name_or_path": tokenizer.name_or_path,
        "vocab_size": len(tokenizer),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_manifest(directory: str, manifest: dict) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as out:
        json.dump(manifest, out, indent=2)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{directory} is not prepared data: {MANIFEST} is missing (run python -m data.prepare)")
    try:
        with open(path) as manifest:
            return json.load(manifest)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg})") from None


def check_tokenizer(directory: str, manifest: dict, tokenizer) -> None:
    """Refuse data tokenized by another tokenizer than ``tokenizer``."""
    recorded = manifest["tokenizer"]
    if recorded["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{directory} was prepared with tokenizer {recorded['name_or_path']!r} "
                        f"(vocabulary {recorded['vocab_size']}, fingerprint {recorded['fingerprint'][:12]}), "
                        f"not with {tokenizer.name_or_path!r} (vocabulary {len(tokenizer)}, fingerprint "
                        f"{tokenizer_fingerprint(tokenizer)[:12]}); prepare it again with this tokenizer")
