"""What the benchmarks share: a randomly initialised teacher and a word-level tokenizer in a directory."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_random_teacher(directory: str, config=None, tokens: int = None) -> None:
    """``directory``: a Hugging Face model of ``config`` (default: the demo teacher's architecture),
    seeded, plus a word-level tokenizer of ``tokens`` ids (default: the model's vocabulary size)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = config or AutoConfig.from_pretrained(os.path.join(ROOT, "launch/configs/models/demo_teacher.json"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(tokens or config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", unk_token="t1", bos_token="t2", eos_token="t3")
    tokenizer.save_pretrained(directory)
