"""training.models: each known family's answers against what the built model actually has.

Every answer is checked against an independent reference: DeepSpeed's own AutoTP (the HF
tensor-parallel plan it applies, its heuristic parser, its vocabulary-parallel embedding check),
the transformers model (its forward's signature, the attention it resolves, the logits it
computes, the dtypes its norms save for backward), and the generic family, which infers from
the model what the job inferred before the families existed (so the answers did not change).
Tiny configs from tests/tiny_models.py, mostly on the meta device: seconds.
"""

import inspect

import pytest
import torch

from core.errors import ConfigError
from tests.tiny_models import gemma2, llama, qwen2
from training.models import (GENERIC, aligned_vocab_size, family, scaled_embedding, takes_logits_to_keep,
                             tied_head, unties_head)

CONFIGS = {"llama": lambda: llama(64), "qwen2": lambda: qwen2(64), "gemma2": lambda: gemma2(64)}
# Norms per decoder layer: Llama and Qwen2 norm before attention and MLP; Gemma-2 also after each.
NORMS = {"llama": 2, "qwen2": 2, "gemma2": 4}


def _meta_model(config, attn_implementation=None):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


@pytest.fixture(params=sorted(CONFIGS))
def known(request):
    config = CONFIGS[request.param]()
    return request.param, config, _meta_model(config)


def test_family_is_chosen_by_transformers_config_class_and_model_type(known):
    name, config, _ = known
    assert family(config).name == name
    assert family(config).supports_fused_head


def test_other_causal_lms_and_remote_code_get_the_generic_family():
    from transformers import GPT2Config, LlamaConfig

    assert family(GPT2Config()) is GENERIC
    assert not GENERIC.supports_fused_head

    class RemoteLlamaConfig(LlamaConfig):  # what trust_remote_code loads: another module, a known model_type
        pass

    assert RemoteLlamaConfig.model_type == "llama" and family(RemoteLlamaConfig()) is GENERIC


def test_decoder_layers_are_the_models_own(known):
    name, config, model = known
    layers = family(config).decoder_layers(model)
    assert len(layers) == config.num_hidden_layers
    assert all(type(layer).__name__ == family(config).decoder_layer_class for layer in layers)
    assert list(model.model.layers) == layers
    assert GENERIC.decoder_layers(model) == layers  # the planner's old *DecoderLayer match


def _decoder_linears(layer):
    return {name.rsplit(".", 1)[-1] for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


def test_row_parallel_names_are_what_deepspeed_autotp_all_reduces(known):
    """DeepSpeed's training AutoTP applies the model's HF tensor-parallel plan where it has one
    (``_get_hf_tp_plan``: ``rowwise`` entries become row-parallel LinearAllreduce layers) and its
    heuristic parser otherwise (``AutoTP.tp_parser``: the linears it lists per decoder-layer class);
    for these families both name the same linears."""
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan

    _, config, model = known
    names = family(config).row_parallel_names
    plan = _get_hf_tp_plan(model)
    assert names == {pattern.rsplit(".", 1)[-1] for pattern, style in plan.items()
                     if style == "rowwise" and pattern.startswith("layers.")}
    parsed = AutoTP.tp_parser(model)
    assert [layer_class.__name__ for layer_class, _ in parsed] == [family(config).decoder_layer_class]
    assert names == {linear.rsplit(".", 1)[-1] for linear in parsed[0][1]}
    linears = _decoder_linears(family(config).decoder_layers(model)[0])
    assert names < linears  # the rest of the decoder's linears are column-parallel
    assert GENERIC.row_parallel_names & linears == names  # the planner counted the same before


def _saved_dtypes(norm, shape):
    """The dtypes of the ``shape``-sized tensors autograd saves in ``norm``'s forward on bf16 input."""
    saved = []

    def pack(tensor):
        if tensor.shape == shape:
            saved.append(tensor.dtype)
        return tensor

    norm = norm.to_empty(device="cpu").to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        norm(x)
    return saved


def test_norms_per_layer_and_whether_they_scale_in_fp32(known):
    """Llama's and Qwen2's norms cast the normalised input back before the weight multiplies it
    (autograd saves a bf16 copy); Gemma-2's multiply by ``1 + w`` in fp32 and save only fp32."""
    name, config, model = known
    layer = family(config).decoder_layers(model)[0]
    norms = family(config).norms(layer)
    assert len(norms) == NORMS[name] and norms == GENERIC.norms(layer)
    shape = (3, config.hidden_size)
    scales_in_fp32 = all(torch.bfloat16 not in _saved_dtypes(norm, shape) for norm in norms)
    assert family(config).fp32_norm_output(layer) == scales_in_fp32 == (name == "gemma2")
    assert GENERIC.fp32_norm_output(layer) == scales_in_fp32


def test_default_attention_is_what_transformers_resolves(known):
    _, config, model = known
    assert family(config).default_attention(config) == model.config._attn_implementation
    assert GENERIC.default_attention(config) == model.config._attn_implementation
    assert family(gemma2(64)).default_attention(gemma2(64)) == "eager"  # sdpa cannot soft-cap the scores


def test_logits_to_keep_is_taken_by_the_known_families_and_read_from_the_forward(known):
    _, config, model = known
    assert "logits_to_keep" in inspect.signature(type(model).forward).parameters
    assert family(config).takes_logits_to_keep(type(model)) and takes_logits_to_keep(model)


def test_a_subclass_whose_forward_lacks_logits_to_keep_is_read_from_its_signature():
    """A transformers config does not promise transformers' forward: a subclass (or remote code)
    without ``logits_to_keep`` gets every position's logits, whichever family its config names."""
    from transformers import LlamaForCausalLM

    class WithoutLogitsToKeep(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    assert family(llama(64)).name == "llama"
    assert not family(llama(64)).takes_logits_to_keep(WithoutLogitsToKeep)
    assert not GENERIC.takes_logits_to_keep(WithoutLogitsToKeep)


def test_the_head_is_what_a_fused_head_may_apply_itself(known):
    """What ``supports_fused_head`` promises: logits = softcap(lm_head(final hidden state)), the head
    a bias-free ``nn.Linear`` and the soft-cap :meth:`final_logit_softcap`'s (Gemma-2's 30)."""
    from transformers import AutoModelForCausalLM

    name, config, _ = known
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    cap = family(config).final_logit_softcap(config)
    assert cap == getattr(config, "final_logit_softcapping", None) and (cap is not None) == (name == "gemma2")
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.bias is None
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        expected = head(hidden) if cap is None else cap * torch.tanh(head(hidden) / cap)
        # fp32 on one process, the same ops in the same order: equal up to the tanh's rounding.
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, config, tied, untied_at_tp2", [
    ("llama", llama(64), False, False),
    ("llama tied", llama(64, tie=True), True, False),
    ("qwen2 tied", qwen2(64), True, False),
    ("qwen2 untied", qwen2(64, tie=False), False, False),
    ("gemma2", gemma2(64), True, True),
])
def test_a_tied_head_is_untied_at_tp2_where_autotp_cannot_share_its_embedding(name, config, tied, untied_at_tp2):
    """The reference: DeepSpeed's vocabulary-parallel embedding refuses any embedding whose forward
    is not ``nn.Embedding``'s (Gemma-2's scaled one); a tied head over one it refuses is untied."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding

    model = _meta_model(config)
    embedding = model.get_input_embeddings()
    try:
        VocabParallelEmbedding.validate_embedding(embedding)
        shareable = True
    except NotImplementedError:
        shareable = False
    assert tied_head(model) == tied and scaled_embedding(embedding) == (not shareable)
    assert unties_head(model, 2) == unties_head(model, 4) == (tied and not shareable) == untied_at_tp2
    assert not unties_head(model, 1)


def test_an_embedding_autotp_sharded_still_counts_as_plain():
    """After ``deepspeed.initialize`` a tied plain embedding at TP > 1 is AutoTP's own class: the
    checkpoint record taken then must still say it is not a scaled one."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding

    sharded = VocabParallelEmbedding(torch.nn.Embedding(8, 4), mp_group=None)
    assert type(sharded) is not torch.nn.Embedding and not scaled_embedding(sharded)


def test_aligned_vocab_size_offline_has_no_tokenizer_to_check():
    assert aligned_vocab_size([1001, 998], None, 4) == 1004
    assert aligned_vocab_size([1001], 1001, 1) == 1001
    with pytest.raises(ConfigError, match="cannot be aligned"):
        aligned_vocab_size([998, 1024], 1000, 2)


def test_the_generic_family_infers_the_same_rules_on_a_model_it_does_not_name():
    """Mistral (Llama-like, no family of its own): layers, row-parallel linears (DeepSpeed's plan),
    norms and attention inferred from the built model."""
    from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=2)
    model = _meta_model(config)
    assert family(config) is GENERIC
    layers = GENERIC.decoder_layers(model)
    assert layers == list(model.model.layers)
    rowwise = {pattern.rsplit(".", 1)[-1] for pattern, style in _get_hf_tp_plan(model).items() if style == "rowwise"}
    assert GENERIC.row_parallel_names & _decoder_linears(layers[0]) == rowwise == {"o_proj", "down_proj"}
    assert len(GENERIC.norms(layers[0])) == 2 and not GENERIC.fp32_norm_output(layers[0])
    assert GENERIC.default_attention(config) == model.config._attn_implementation == "sdpa"


def test_a_config_without_a_causal_lm_is_refused_by_name():
    from transformers import CLIPVisionConfig

    with pytest.raises(ConfigError, match="CLIPVisionConfig"):
        GENERIC.default_attention(CLIPVisionConfig())


def test_every_shipped_architecture_has_a_known_family():
    """The planner's offline shapes (launch/configs/models) are all families this file states."""
    import glob
    import os

    from transformers import AutoConfig

    models = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "configs", "models")
    paths = sorted(glob.glob(os.path.join(models, "*.json")))
    assert paths
    for path in paths:
        assert family(AutoConfig.from_pretrained(path)) is not GENERIC, path


def test_the_checkpoint_records_an_autotp_sharded_tied_embedding_as_plain():
    """``training.checkpoint.head_record`` runs after ``deepspeed.initialize``: a tied Llama at
    TP > 1 keeps its head tied to AutoTP's ``VocabParallelEmbedding``, which is no scaled embedding,
    so a universal conversion must not untie it (the record said ``scaled_embedding: True`` when it
    compared the class with ``nn.Embedding``)."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding
    from transformers import AutoModelForCausalLM

    from training.checkpoint import head_record

    model = AutoModelForCausalLM.from_config(llama(64, tie=True))
    sharded = VocabParallelEmbedding(model.get_input_embeddings(), mp_group=None)  # as AutoTP swaps it in
    model.set_input_embeddings(sharded)
    assert model.get_output_embeddings().weight is sharded.weight
    assert head_record(model) == {"tied": True, "head": "lm_head.weight", "embedding": "model.embed_tokens.weight",
                                  "scaled_embedding": False}
    gemma = AutoModelForCausalLM.from_config(gemma2(64))
    assert head_record(gemma)["scaled_embedding"] and head_record(gemma)["tied"]
