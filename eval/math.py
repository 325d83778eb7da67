"""Math word-problem accuracy: greedy generation, the number after ``####``, exact match.

    python -m eval.math --model DIR --data SFT.jsonl [--max-examples N] [--max-new-tokens 128]

``--data`` holds ``{"prompt", "response"}`` rows (as ``data.synthetic`` writes them, or GSM8K-style
data); the reference answer is the number after the response's ``####``.
"""

import argparse
import json
import re
import sys
from decimal import Decimal, InvalidOperation
from typing import Optional

import torch

_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


def extract_answer(text: str) -> Optional[str]:
    """The number after the last ``####`` in canonical form ("1,200.50" → "1200.5"), or None."""
    matches = _ANSWER.findall(text)
    if not matches:
        return None
    try:
        number = Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, *, max_new_tokens: int = 128, batch_size: int = 16):
    """Greedy continuations of ``prompts`` (plain text, tokenized without special tokens)."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                            return_tensors="pt")
        generated = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        outputs += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def math_accuracy(model, tokenizer, examples, **generation) -> dict:
    """``{"accuracy", "correct", "total", "answered"}`` over ``examples`` (dicts with prompt/response)."""
    completions = generate_answers(model, tokenizer, [e["prompt"] for e in examples], **generation)
    predicted = [extract_answer(c) for c in completions]
    expected = [extract_answer(e["response"]) for e in examples]
    correct = sum(p is not None and p == e for p, e in zip(predicted, expected))
    return {"accuracy": correct / max(len(examples), 1), "correct": correct, "total": len(examples),
            "answered": sum(p is not None for p in predicted)}


def read_examples(path: str, limit: int = 0):
    with open(path) as lines:
        examples = [json.loads(line) for line in lines if line.strip()]
    return examples[:limit] if limit else examples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.math", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (e.g. an exported student)")
    parser.add_argument("--data", required=True, help="JSONL of {prompt, response} with '#### <number>' answers")
    parser.add_argument("--max-examples", type=int, default=0, help="0: all")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = math_accuracy(model, tokenizer, read_examples(args.data, args.max_examples),
                           max_new_tokens=args.max_new_tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
