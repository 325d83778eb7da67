"""Train a SentencePiece tokenizer and save it as a Hugging Face tokenizer directory.

    python -m data.tokenizer --input FILE [FILE ...] --vocab-size N --out DIR [--model-type bpe|unigram]

The directory loads with ``AutoTokenizer.from_pretrained(DIR)``: special tokens ``<pad>`` = 0,
``<unk>`` = 1, ``<s>`` (bos) = 2, ``</s>`` (eos) = 3, digits split one per token, byte fallback for
unseen characters, and a minimal chat template (``<|user|>`` / ``<|assistant|>`` turns) so chat
``messages`` data works out of the box. Inputs are text files (one document per line) or JSONL
files whose string fields are used as text. Anywhere the project takes a tokenizer, any existing
Hugging Face tokenizer directory (or hub name, where the hub is reachable) works too.
"""

import argparse
import json
import os
import tempfile

from core.cli import run_main
from core.errors import DataError
from core.files import atomic_directory
from data.sources import require_files

SPECIAL = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>",
               eos_piece="</s>")
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _text_lines(paths):
    """Yield training sentences: lines of text files, string values of JSONL rows."""
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                if not path.endswith(".jsonl"):
                    yield line.rstrip("\n")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                values = row.values() if isinstance(row, dict) else []
                yield from (value for value in values if isinstance(value, str) and value)


def train_tokenizer(inputs, out_dir: str, *, vocab_size: int, model_type: str = "bpe") -> str:
    """Train on ``inputs`` and write the HF tokenizer directory ``out_dir`` (atomically)."""
    import sentencepiece
    from transformers import LlamaTokenizer

    require_files(inputs)
    if vocab_size < 261:
        raise DataError(f"--vocab-size must be > 260 (4 special tokens, 256 byte-fallback tokens and the corpus' "
                        f"characters), got {vocab_size}")
    with tempfile.TemporaryDirectory() as work, atomic_directory(out_dir) as staging:
        model_prefix = os.path.join(work, "tokenizer")
        try:
            sentencepiece.SentencePieceTrainer.train(sentence_iterator=_text_lines(inputs),
                                                     model_prefix=model_prefix,
                                                     vocab_size=vocab_size,
                                                     model_type=model_type,
                                                     character_coverage=1.0,
                                                     byte_fallback=True,
                                                     split_digits=True,
                                                     minloglevel=2,
                                                     **SPECIAL)
        except RuntimeError as error:  # e.g. a vocabulary too large for the corpus
            raise DataError(f"SentencePiece could not train a {vocab_size}-token vocabulary on {', '.join(inputs)}: "
                            f"{str(error).strip().splitlines()[-1]}") from None
        spm_dir = os.path.join(work, "spm")
        os.makedirs(spm_dir)
        os.replace(model_prefix + ".model", os.path.join(spm_dir, "tokenizer.model"))
        # transformers converts the SentencePiece model to its fast (tokenizers) form here.
        tokenizer = LlamaTokenizer.from_pretrained(spm_dir, pad_token=SPECIAL["pad_piece"], legacy=False)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text (.txt) or JSONL files to train on")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    parser.add_argument("--out", required=True, help="output tokenizer directory (replaced atomically)")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model type")
    args = parser.parse_args(argv)
    train_tokenizer(args.input, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
    print(f"tokenizer with {args.vocab_size} tokens written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
