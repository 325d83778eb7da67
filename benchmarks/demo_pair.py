"""What the benchmarks share: the teacher-student pairs they train, each written into a directory
(a randomly initialised teacher, its tokenizer and the student's architecture), built here offline.

Pairs (:data:`PAIRS`; Llama, untied heads, fp32 on CPU):

========  ===========================  ===========================  ==================================  ========
pair      student (width x layers)     teacher (width x layers)     vocabulary V                        sequence
========  ===========================  ===========================  ==================================  ========
demo      64 x 2 (demo_student.json)   128 x 4 (demo_teacher.json)  1,024, word-level (ids only)         128
small     32 x 2                       64 x 4                       1,024, word-level (ids only)         64
wide      128 x 2                      256 x 4                      16,384 byte-level BPE tokens        128
========  ===========================  ===========================  ==================================  ========

``wide`` is a pair whose vocabulary dominates: V is 128 times the student's width (a 1B student
with a 256k vocabulary is ~125 times), so the output layers and the logits are most of a step's
work. Its tokenizer is trained here with the ``tokenizers`` library on the embedded demo corpus
(``data.synthetic``, 1 MB of stories and word problems): every one of its V ids is a byte or a
learned merge (no padding rows), which this corpus supports because merges may cross spaces.
``small`` is a tiny pair for short sequences, where a step's fixed costs dominate.
"""

import os
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0-3: pad, unk, bos, eos (the models' config)
# ``--fused`` of the benchmarks: the ``loss.fused_head`` values to run (None: the key left unset).
FUSED = {None: (None,), "off": (False,), "on": (True,), "both": (False, True)}


@dataclass(frozen=True)
class Pair:
    """One benchmark pair: each model's (hidden width, layers), the vocabulary and its tokenizer
    (``word``: one id per vocabulary row, no text; ``bpe``: byte-level BPE trained on the demo corpus),
    and the sequence length it is timed at."""

    student: tuple
    teacher: tuple
    vocab: int
    tokenizer: str
    seq_len: int


PAIRS = {
    "demo": Pair(student=(64, 2), teacher=(128, 4), vocab=1024, tokenizer="word", seq_len=128),
    "small": Pair(student=(32, 2), teacher=(64, 4), vocab=1024, tokenizer="word", seq_len=64),
    "wide": Pair(student=(128, 2), teacher=(256, 4), vocab=16384, tokenizer="bpe", seq_len=128),
}


def llama_config(width: int, layers: int, vocab: int, positions: int = 512):
    """A Llama architecture of ``width`` (intermediate 3 x width, head dimension 16 or width / 4,
    half as many key-value heads), untied, with the special ids of :data:`SPECIAL_TOKENS`."""
    from transformers import LlamaConfig

    heads = max(2, min(4, width // 16))
    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=positions,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=2,
                       eos_token_id=3, pad_token_id=0)


def word_tokenizer(tokens: int):
    """A word-level tokenizer of ``tokens`` ids named ``t0``, ``t1``, ... (ids only: the benchmarks feed ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(tokens)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", unk_token="t1", bos_token="t2", eos_token="t3")


def bpe_tokenizer(tokens: int, megabytes: float = 1.0):
    """A byte-level BPE tokenizer of exactly ``tokens`` ids (4 special, 256 bytes, the rest merges)
    trained on ``megabytes`` of the embedded demo corpus (pre-training stories and SFT problems).
    No pre-tokenizer split on spaces, so merges span words (``'.ĠThenĠheĠwalkedĠto...'``): this
    corpus has a few hundred distinct words, and only multi-word merges give it 8k-32k real tokens.
    Raises ``ValueError`` where the corpus yields fewer merges than asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data.synthetic import generate

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tokens, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with tempfile.TemporaryDirectory() as work:
        generate(work, megabytes=megabytes, sft_examples=max(2, int(200 * megabytes)))
        tokenizer.train([os.path.join(work, "pretrain/train.txt"), os.path.join(work, "sft/train.jsonl")], trainer)
    if tokenizer.get_vocab_size() != tokens:
        raise ValueError(f"the demo corpus gave {tokenizer.get_vocab_size()} BPE tokens, not {tokens}")
    pad, unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, unk_token=unk, bos_token=bos,
                                   eos_token=eos)


def save_random_teacher(directory: str, config=None, tokens: int = None, tokenizer=None) -> None:
    """``directory``: a Hugging Face model of ``config`` (default: the demo teacher's architecture),
    seeded, plus ``tokenizer`` (default: a word-level tokenizer of ``tokens`` ids, by default the
    model's vocabulary size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(os.path.join(ROOT, "launch/configs/models/demo_teacher.json"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    (tokenizer or word_tokenizer(tokens or config.vocab_size)).save_pretrained(directory)


def write_pair(name: str, directory: str) -> str:
    """Write pair ``name`` of :data:`PAIRS` into ``directory``: ``teacher/`` (random weights and the
    tokenizer) and ``student.json`` (the student's architecture); returns the student config's path.
    The demo pair's models are the demo's own config files."""
    from transformers import AutoConfig

    pair = PAIRS[name]
    models = os.path.join(ROOT, "launch/configs/models")
    if name == "demo":
        teacher = AutoConfig.from_pretrained(os.path.join(models, "demo_teacher.json"))
        student = AutoConfig.from_pretrained(os.path.join(models, "demo_student.json"))
    else:
        teacher, student = llama_config(*pair.teacher, pair.vocab), llama_config(*pair.student, pair.vocab)
    tokenizer = bpe_tokenizer(pair.vocab) if pair.tokenizer == "bpe" else word_tokenizer(pair.vocab)
    save_random_teacher(os.path.join(directory, "teacher"), teacher, tokenizer=tokenizer)
    student.to_json_file(os.path.join(directory, "student.json"))
    return os.path.join(directory, "student.json")


def fused_override(fused) -> list:
    """``[]`` for None (``loss.fused_head`` left at the config's value), else its override."""
    return [] if fused is None else [f"loss.fused_head={str(fused).lower()}"]


def refused_overrides(overrides) -> list:
    """Those of ``overrides`` (``key=value``) that this checkout's ``training.config`` refuses on the demo
    config (a key or value not there yet), each with the reason: a benchmark asks before it spawns."""
    from core.errors import ConfigError
    from training.config import load_config

    refused = []
    for override in sorted(set(overrides)):
        try:
            load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"), [override])
        except ConfigError as error:
            refused.append(f"{override} ({str(error).splitlines()[0]})")
    return refused
