"""The plan's view of one model: its sizes and the ops that decide its memory, counted on the meta
device from a local ``config.json`` (no weights, no hub). The per-family rules (decoder layers,
row-parallel names, norms, soft-caps, the untied head, vocabulary alignment) are
:mod:`training.models`'; this module only counts."""

import functools
import glob
import json
import os
from dataclasses import dataclass

from core.errors import ConfigError
from training.models import (aligned_vocab_size, family, fused_head_problem, takes_logits_to_keep, tied_head,
                             unties_head)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS_DIR = os.path.join(_ROOT, "launch", "configs", "models")
# The MLP's linears by the names the architectures AutoTP knows give them (a gated MLP has three).
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3", "c_fc", "c_proj")


class UnknownArchitecture(ConfigError):
    """The planner cannot shape a model from its config: transformers does not know the architecture
    (or it needs remote code, which the planner never runs), or the model has no decoder layers to count.
    A :class:`ConfigError`, so an entry point reports it on one line."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model, counted on the meta device (after vocabulary alignment)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sharded: int
    """Parameters AutoTP splits over the tensor-parallel ranks (decoder linears; the head separately)."""
    replicated: int
    """Parameters every tensor-parallel rank holds whole (embedding, norms, biases of split layers)."""
    head: int
    """Parameters of a separate LM head (0 when tied and kept tied)."""
    largest_layer: int
    """Parameters of the largest decoder layer (ZeRO-3 gathers one at a time, at least)."""
    attention: str
    """The attention implementation transformers resolves for the model (``eager`` materialises
    ``[heads, seq, seq]`` scores; ``sdpa`` and the flash kernels do not). Gemma-2 has no sdpa
    (transformers refuses it: soft-capping), so it resolves to eager."""
    row_parallel: int
    """Linear layers per decoder layer whose output AutoTP all-reduces in forward (o_proj, down_proj)."""
    column_parallel: int
    """The other linear layers per decoder layer, whose input gradient AutoTP all-reduces in backward."""
    tensors: tuple
    """``(elements, split by AutoTP)`` of every parameter tensor on one TP rank (ZeRO-3 keeps those
    at or below its persistence threshold whole on every rank and never gathers them)."""
    norms: int = 2
    """RMS/layer norms per decoder layer (Llama 2, Gemma-2 4)."""
    fp32_norm_output: bool = False
    """The norm scales its fp32 normalised input by its weight in fp32 and saves that fp32 tensor
    (Gemma's ``x * (1 + w.float())``); otherwise it casts back first and saves the cast (Llama)."""
    softcap: bool = False
    """Eager attention soft-caps its scores (``tanh``, which saves its ``[heads, seq, seq]`` output)."""
    final_softcap: bool = False
    """The head's logits are soft-capped (``tanh`` over ``[tokens, vocab]``)."""
    gated_mlp: bool = True
    """The MLP is ``down(act(gate(x)) * up(x))`` (saves 4 intermediate-sized tensors) rather than
    ``fc2(act(fc1(x)))`` (2)."""
    mask_kinds: int = 1
    """Distinct ``[seq, seq]`` masks an eager forward builds (2 with sliding-window layers)."""
    fused_head: bool = False
    """The loss may apply the model's output layer itself, in chunks (``loss.fused_head: auto`` turns
    it on: :func:`training.models.fused_head_problem` finds nothing on the model as transformers builds it)."""
    keeps_logits: bool = False
    """The causal LM's forward takes ``logits_to_keep`` (:func:`training.models.takes_logits_to_keep`):
    generation's prefill asks for the last position's logits only (``training.generation``)."""
    cache_windows: tuple = ()
    """Per decoder layer, the sliding window of its KV-cache layer (None: it keeps every position), as
    transformers' ``DynamicCache(config=...)`` builds them (Gemma-2 alternates windowed and full
    layers); empty: every layer keeps every position."""

    @property
    def eager_attention(self) -> bool:
        return self.attention == "eager"

    def persistent(self, threshold: float) -> int:
        return sum(n for n, _ in self.tensors if n <= threshold)

    def replicated_persistent(self, threshold: float) -> int:
        return sum(n for n, split in self.tensors if n <= threshold and not split)

    def per_rank(self, tp: int) -> int:
        """Parameters on one tensor-parallel rank."""
        return (self.sharded + self.head) // tp + self.replicated

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (everything but the embedding lookup)."""
        return self.sharded + (self.head or self.vocab * self.hidden)


def architecture_source(section, key: str) -> str:
    """A local config for ``section``: its ``config`` file, its local ``path``, or a shipped
    architecture in launch/configs/models whose ``_name_or_path`` is the hub id in ``path``.
    Raises :class:`ConfigError` naming ``key`` where there is none."""
    source = getattr(section, "config", None) or section.path
    if source is None:
        raise ConfigError(f"{key}.path: required to plan")
    if os.path.exists(source):
        return source
    for candidate in sorted(glob.glob(os.path.join(MODELS_DIR, "*.json"))):
        with open(candidate) as handle:
            if json.load(handle).get("_name_or_path") == source:
                return candidate
    raise ConfigError(f"{key}.path: {source!r} is not a local directory and no architecture in "
                      f"{os.path.relpath(MODELS_DIR)} has _name_or_path {source!r}; add its config.json there")


def _auto_config(source: str):
    """``AutoConfig.from_pretrained(source)``; :class:`UnknownArchitecture` where transformers cannot
    read it as a known architecture (a missing file stays ``OSError``)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except ValueError as error:  # an unrecognised model_type, or remote code the planner does not run
        raise UnknownArchitecture(f"{source}: transformers cannot build this architecture offline "
                                  f"({str(error).splitlines()[0]})") from None


@functools.lru_cache(maxsize=None)
def vocab_rows(source: str) -> int:
    """The embedding rows ``source``'s config asks for (before alignment)."""
    return _auto_config(source).get_text_config().vocab_size


def aligned_vocab(sources, tp: int) -> int:
    """The one vocabulary size of both heads at tensor-parallel size ``tp`` (as the job aligns them;
    no tokenizer offline)."""
    return aligned_vocab_size((vocab_rows(source) for source in sources), None, tp)


def _meta_model(config, source: str, attn_implementation: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            # The implementation the job gets: "auto" leaves the choice to transformers, as training.engines does.
            return AutoModelForCausalLM.from_config(
                config, attn_implementation=None if attn_implementation == "auto" else attn_implementation)
        except ValueError as error:  # a config class without a causal LM
            raise UnknownArchitecture(f"{source}: no causal LM for this config ({str(error).splitlines()[0]})"
                                      ) from None


def _parameter_counts(model, head_params: int, tp: int):
    """``(sharded, replicated, tensors)``: AutoTP splits every ``nn.Linear`` weight outside the
    embedding and head; everything else (the embedding included) is replicated."""
    import torch

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    sharded = replicated = 0
    tensors = [(embedding.weight.numel(), False)]
    if head_params:
        tensors.append((head_params // tp, True))
    seen = {id(embedding.weight)} | ({id(head.weight)} if head is not None else set())
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            split = isinstance(module, torch.nn.Linear) and name == "weight"
            if split:
                sharded += parameter.numel()
            else:
                replicated += parameter.numel()
            tensors.append((parameter.numel() // tp if split else parameter.numel(), split))
    replicated += embedding.weight.numel()
    return sharded, replicated, tuple(tensors)


def _head_params(model, tp: int) -> int:
    """Parameters of a separate LM head: the embedding's copy where the job unties it at ``tp``."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if unties_head(model, tp):
        return embedding.weight.numel()
    return 0 if head is None or tied_head(model) else head.weight.numel()


def _layer_ops(model, source: str):
    """``(layers, largest, linears, norms, fp32 norm output)`` of the decoder layers, by the family's rules."""
    import torch

    rules = family(model.config)
    layers = rules.decoder_layers(model)
    if not layers:
        raise UnknownArchitecture(f"{source}: no decoder layers found ({rules.name} family) to count")
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    linears = [name.rsplit(".", 1)[-1] for name, module in layers[0].named_modules()
               if isinstance(module, torch.nn.Linear)]
    return rules, largest, linears, rules.norms(layers[0]), rules.fp32_norm_output(layers[0])


def _cache_windows(config) -> tuple:
    """Per decoder layer, the window ``DynamicCache(config=config)`` gives its layer (None: a full
    layer), by transformers' own rule (``cache_utils.get_layer_types_and_kwargs``: a sliding or
    chunked layer takes its ``sliding_window``; every other kind is counted as full, a bound)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    _, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return tuple(layer.get("sliding_window") for layer in kwargs)


def _dimensions(text, source: str) -> dict:
    """The sizes :class:`ModelShape` takes from the text config; :class:`UnknownArchitecture` where a
    config does not name them as Llama's does (e.g. GPT-2's ``n_inner``)."""
    try:
        heads = text.num_attention_heads
        return dict(layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                    heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                    head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads)
    except AttributeError as error:
        raise UnknownArchitecture(f"{source}: the planner reads Llama-style sizes from a config ({error})") from None


@functools.lru_cache(maxsize=None)
def model_shape(source: str, *, vocab: int, tp: int, attn_implementation: str = "auto") -> ModelShape:
    """Count ``source``'s parameters on the meta device, with ``vocab`` embedding rows (cached: a
    plan compares every layout, and a plan that fits nowhere plans again for bigger clusters).
    Raises :class:`UnknownArchitecture` where it cannot build or count the model."""
    config = _auto_config(source)
    config.vocab_size = vocab
    text = config.get_text_config()
    dimensions = _dimensions(text, source)
    model = _meta_model(config, source, attn_implementation)
    head_params = _head_params(model, tp)
    sharded, replicated, tensors = _parameter_counts(model, head_params, tp)
    rules, largest, linears, norms, fp32_norms = _layer_ops(model, source)
    row = sum(name in rules.row_parallel_names for name in linears)
    attention = model.config.get_text_config()._attn_implementation or "eager"
    return ModelShape(**dimensions, vocab=vocab, sharded=sharded, replicated=replicated, head=head_params,
                      largest_layer=largest, attention=attention, row_parallel=row, column_parallel=len(linears) - row,
                      tensors=tensors, norms=len(norms), fp32_norm_output=fp32_norms,
                      softcap=rules.attention_softcap(config) is not None,
                      final_softcap=rules.final_logit_softcap(config) is not None,
                      gated_mlp="gate_proj" in linears or sum(name in _MLP_LINEARS for name in linears) >= 3,
                      mask_kinds=max(len(set(getattr(text, "layer_types", None) or [])), 1),
                      fused_head=fused_head_problem(model) is None, keeps_logits=takes_logits_to_keep(model),
                      cache_windows=_cache_windows(config))
