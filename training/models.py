"""Model families: every rule the job follows because of *which* causal LM it runs, in one file.

``family(config)`` answers for a transformers config; the engines, the step and the planner ask it
instead of matching class names themselves. Llama, Qwen2 and Gemma-2 are known families, whose
answers are written out here and checked against the built models by ``tests/test_models.py``;
any other causal LM gets :data:`GENERIC`, which infers the same answers from the model as the job
always has (so no model the job accepted is refused).

Adding a family: one :class:`Family` entry in :data:`_FAMILIES`, keyed by the config's
``model_type``; a tiny config in ``tests/tiny_models.py`` and its row in ``tests/test_models.py``;
for the planner's offline shapes, its ``config.json`` in ``launch/configs/models/`` (hub ids only).

Rules that hold for every family (functions below, not fields):

- **Untie a scaled embedding** (:func:`unties_head`, :func:`untie_head`): AutoTP's
  vocabulary-parallel head shares a tied embedding only when it is a plain ``nn.Embedding``
  (DeepSpeed's ``VocabParallelEmbedding.validate_embedding``), so a tied head over a scaled one
  (Gemma-2's) gets its own copy at ``tensor_parallel`` > 1. The engines and the planner both ask
  these, so they agree on when it happens; for a checkpoint's head record, :func:`tied_head` and
  :func:`scaled_embedding` answer the same after ``deepspeed.initialize``.
- **Vocabulary alignment** (:func:`aligned_vocab_size`): both heads share one size, a multiple of
  the tensor-parallel size.
"""

import contextlib
import functools
import inspect
import sys
from dataclasses import dataclass
from typing import FrozenSet, Iterable, List, Optional

import torch

from core.errors import ConfigError

# The decoder linears AutoTP makes row-parallel (LinearAllreduce: input split, output all-reduced
# in forward) for a model without a tensor-parallel plan, by name, across the architectures its
# heuristic (``AutoTP.tp_parser``) knows. The known families' plans name exactly o_proj and down_proj.
_GENERIC_ROW_PARALLEL = frozenset({"o_proj", "down_proj", "out_proj", "dense", "dense_4h_to_h", "fc2", "w2", "wo",
                                   "c_proj"})


@dataclass(frozen=True)
class Family:
    """What the job needs to know of one model family. Fields are facts of the family; methods
    that need the model take it (the generic family infers from it what known families state)."""

    name: str
    """``llama``, ``qwen2``, ``gemma2``, or ``generic``."""
    decoder_layer_class: Optional[str]
    """Class name of one decoder layer (``LlamaDecoderLayer``); None (generic): any ``*DecoderLayer``."""
    row_parallel_names: FrozenSet[str]
    """Names of the decoder linears AutoTP makes row-parallel (output all-reduced in forward); the
    other decoder linears are column-parallel (input gradient all-reduced in backward)."""
    norm_class: Optional[str] = None
    """Class name of the family's RMS norm; None (generic): any module whose class name has ``norm``."""
    norm_scales_in_fp32: Optional[bool] = None
    """The norm multiplies its fp32 normalised input by its weight in fp32 and returns that product
    cast once (Gemma's ``x * (1 + w.float())``: autograd saves an fp32 tensor), rather than casting
    back before the weight (Llama's). None (generic): inferred from the norms' class names."""
    attention: Optional[str] = None
    """What transformers resolves for ``attn_implementation=None`` (the job's ``auto``): ``sdpa``, or
    ``eager`` where the model class has no sdpa path (Gemma-2: sdpa cannot soft-cap the scores).
    None (generic): read from the model class."""
    supports_fused_head: bool = False
    """The head is a plain ``nn.Linear`` (``lm_head``, tied or not, bias-free) applied to the base model's
    final hidden states, followed only by :meth:`final_logit_softcap`: the loss may apply it itself,
    in chunks (issue 22's fused head). False for the generic family: its head is not known."""

    def decoder_layers(self, model) -> List[torch.nn.Module]:
        """The decoder layers of ``model``, in module order."""
        if self.decoder_layer_class is None:
            return [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
        return [module for module in model.modules() if type(module).__name__ == self.decoder_layer_class]

    def norms(self, layer) -> List[torch.nn.Module]:
        """The norm modules inside one decoder layer (Llama and Qwen2 2, Gemma-2 4)."""
        if self.norm_class is None:
            return [module for module in layer.modules() if "norm" in type(module).__name__.lower()]
        return [module for module in layer.modules() if type(module).__name__ == self.norm_class]

    def fp32_norm_output(self, layer) -> bool:
        """Whether ``layer``'s norms scale in fp32 (:attr:`norm_scales_in_fp32`); the generic family
        says so for Gemma's norms, whose class names start with ``Gemma``."""
        if self.norm_scales_in_fp32 is not None:
            return self.norm_scales_in_fp32
        return any(type(norm).__name__.startswith("Gemma") for norm in self.norms(layer))

    def default_attention(self, config) -> str:
        """The attention implementation transformers gives ``config``'s causal LM when none is asked
        for: ``sdpa`` where the model class supports it, else ``eager`` (transformers 5's
        ``get_correct_attn_implementation``)."""
        if self.attention is not None:
            return self.attention
        return "sdpa" if getattr(_causal_lm_class(config), "_supports_sdpa", False) else "eager"

    def takes_logits_to_keep(self, model_class) -> bool:
        """Whether ``model_class.forward`` applies the head to the positions ``logits_to_keep`` names
        (else the step computes every position's logits and copies the kept ones out). Read from the
        signature in every family: the known families' transformers classes take it, but a subclass
        (or remote code with a transformers config) may not."""
        return _forward_takes(model_class, "logits_to_keep")

    def final_logit_softcap(self, config) -> Optional[float]:
        """``c`` when the head's logits are ``c · tanh(z / c)`` (Gemma-2's ``final_logit_softcapping``), else None."""
        return getattr(config.get_text_config(), "final_logit_softcapping", None)

    def attention_softcap(self, config) -> Optional[float]:
        """``c`` when eager attention soft-caps its scores (Gemma-2's ``attn_logit_softcapping``), else None."""
        return getattr(config.get_text_config(), "attn_logit_softcapping", None)


_LLAMA_ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
_FAMILIES = {
    "llama": Family(name="llama", decoder_layer_class="LlamaDecoderLayer", row_parallel_names=_LLAMA_ROW_PARALLEL,
                    norm_class="LlamaRMSNorm", norm_scales_in_fp32=False, attention="sdpa",
                    supports_fused_head=True),
    "qwen2": Family(name="qwen2", decoder_layer_class="Qwen2DecoderLayer", row_parallel_names=_LLAMA_ROW_PARALLEL,
                    norm_class="Qwen2RMSNorm", norm_scales_in_fp32=False, attention="sdpa",
                    supports_fused_head=True),
    "gemma2": Family(name="gemma2", decoder_layer_class="Gemma2DecoderLayer", row_parallel_names=_LLAMA_ROW_PARALLEL,
                     norm_class="Gemma2RMSNorm", norm_scales_in_fp32=True, attention="eager",
                     supports_fused_head=True),
}
GENERIC = Family(name="generic", decoder_layer_class=None, row_parallel_names=_GENERIC_ROW_PARALLEL)
"""Any other causal LM: today's inferences from the built model."""


def family(config) -> Family:
    """The family of ``config`` (a transformers ``PretrainedConfig``; a multimodal one answers for its
    text model). Only transformers' own config classes select a known family: remote code that
    reuses a ``model_type`` gets :data:`GENERIC`, which reads the model instead of trusting the name."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not type(text).__module__.startswith("transformers.models."):
        return GENERIC
    return _FAMILIES.get(getattr(text, "model_type", None), GENERIC)


def takes_logits_to_keep(model) -> bool:
    """Whether ``model`` (a causal LM, not a DeepSpeed engine) takes ``logits_to_keep``
    (:meth:`Family.takes_logits_to_keep`; cached per class: the step asks twice per micro-batch)."""
    return _forward_takes(type(model), "logits_to_keep")


@functools.lru_cache(maxsize=None)
def _forward_takes(model_class, argument: str) -> bool:
    return argument in inspect.signature(model_class.forward).parameters


def fused_head_problem(model) -> Optional[str]:
    """Why the loss may not apply ``model``'s output layer itself (issue 22's fused head), or None.

    ``model``: a causal LM after ``deepspeed.initialize`` (the engine's ``module``), whose head may
    be AutoTP's ``VocabParallelLinear``. The fused head needs a known family
    (:attr:`Family.supports_fused_head`: the head is applied to the final hidden states and followed
    only by :meth:`Family.final_logit_softcap`), a forward taking ``logits_to_keep`` (the head's input
    is then exactly the kept positions) and a bias-free ``nn.Linear`` or ``VocabParallelLinear``
    holding this rank's slice (not gathering its output)."""
    config = model.config
    rules = family(config)
    name = f"{type(model).__name__} ({getattr(config, 'model_type', None)!r})"
    if not rules.supports_fused_head:
        return f"{name}: training.models does not know its output layer (family {rules.name!r})"
    if not takes_logits_to_keep(model):
        return f"{name}: its forward takes no logits_to_keep"
    head = model.get_output_embeddings()
    layers = sys.modules.get("deepspeed.module_inject.layers")
    vocab_parallel = layers is not None and isinstance(head, layers.VocabParallelLinear)
    if not (type(head) is torch.nn.Linear or vocab_parallel):
        return f"{name}: its output layer is a {type(head).__name__}, not an nn.Linear or VocabParallelLinear"
    if getattr(head, "bias", None) is not None:
        return f"{name}: its output layer has a bias"
    if vocab_parallel and head.gather_output:
        return f"{name}: its VocabParallelLinear gathers its output"
    return None


@contextlib.contextmanager
def without_final_softcap(model):
    """Inside: ``model``'s forward leaves its head's output as it is (Gemma-2 applies
    ``final_logit_softcapping`` to whatever the head returns; the fused head applies it itself).
    Yields the soft-cap ``c`` (None where the model has none); restored on leaving, error or not.
    Not thread-safe: it changes the model's config for the duration."""
    text = model.config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    if softcap is None:
        yield None
        return
    text.final_logit_softcapping = None
    try:
        yield softcap
    finally:
        text.final_logit_softcapping = softcap


def _causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ConfigError(f"model config: {type(config).__name__} ({getattr(config, 'model_type', None)!r}) has no "
                          f"causal LM class in transformers") from None


# ---------------------------------------------------------------------------------------------
# Rules for every family: the tied head over a scaled embedding, vocabulary alignment


def tied_head(model) -> bool:
    """The causal LM's head weight *is* its input embedding's."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def scaled_embedding(embedding) -> bool:
    """``embedding`` (a model's input embedding module) is not a plain ``nn.Embedding`` (Gemma-2's
    scales its output by √hidden), so AutoTP's vocabulary-parallel head cannot share it.

    The same answer before and after ``deepspeed.initialize``: at ``tensor_parallel`` > 1 AutoTP
    replaces a tied embedding with its ``VocabParallelEmbedding``, which in this job was a plain one
    (every other tied embedding is untied first, :func:`unties_head`)."""
    if type(embedding) is torch.nn.Embedding:
        return False
    # Without DeepSpeed imported no AutoTP embedding exists (the planner's meta models never import it).
    layers = sys.modules.get("deepspeed.module_inject.layers")
    return not (layers is not None and isinstance(embedding, layers.VocabParallelEmbedding))


def unties_head(model, tp: int) -> bool:
    """Whether the job gives ``model`` (built, before ``deepspeed.initialize``; the meta device will
    do) a head of its own at tensor-parallel size ``tp``: tied over a scaled embedding and ``tp`` > 1.
    At TP 1 the head stays tied (no vocabulary-parallel head to share it)."""
    return tp > 1 and tied_head(model) and scaled_embedding(model.get_input_embeddings())


def untie_head(model, zero_only: Optional[dict]) -> None:
    """Give ``model`` its own LM head, a copy of the tied embedding (see :func:`unties_head`).

    For a frozen teacher nothing changes; a student then trains its head separately from its
    embedding (see README). ``zero_only``: the ZeRO-3 config the model was partitioned under
    (None: built whole on the host). Collective under ZeRO-3 (gathers the embedding).
    """
    import deepspeed

    embedding = model.get_input_embeddings()
    with deepspeed.zero.GatheredParameters([embedding.weight]):
        weight = embedding.weight.detach().clone()
    partitioned = zero_only is not None
    with deepspeed.zero.Init(config_dict_or_path=zero_only) if partitioned else contextlib.nullcontext():
        new_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype,
                                   device=weight.device)
    # Partitioned: rank 0's copy is what every rank keeps. Unpartitioned: every rank copies its own.
    with deepspeed.zero.GatheredParameters([new_head.weight], modifier_rank=0):
        if torch.distributed.get_rank() == 0 or not partitioned:
            new_head.weight.data.copy_(weight)
    del weight
    model.set_output_embeddings(new_head)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def aligned_vocab_size(sizes: Iterable[int], real_vocab_size: Optional[int], tp: int) -> int:
    """One vocabulary size for both heads: the largest of ``sizes`` (the models' embedding rows),
    rounded up to a multiple of ``tp``. Refuses a model with fewer rows than ``real_vocab_size``
    (``len(tokenizer)``; None where no tokenizer is at hand, as when planning offline)."""
    sizes = list(sizes)
    small = [size for size in sizes if real_vocab_size is not None and size < real_vocab_size]
    if small:
        raise ConfigError(f"vocabulary: a model has {min(small)} embedding rows but the tokenizer has "
                          f"{real_vocab_size} tokens; the vocabularies cannot be aligned")
    return -(-max(sizes) // tp) * tp


def load_model_config(section, key: str):
    """The transformers config of a run config's ``student`` / ``teacher`` section (``key``), read
    from its ``path`` or ``config`` (no model is built); :class:`ConfigError` naming ``key`` and the
    source where it cannot be loaded."""
    from transformers import AutoConfig

    source = section.path or section.config
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=section.trust_remote_code,
                                          revision=section.revision)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for a bad source
        raise ConfigError(f"{key}: could not load a model config from {source!r}: {str(error).splitlines()[0]}"
                          ) from None
