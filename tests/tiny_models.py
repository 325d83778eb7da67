"""Tiny models of the architectures the job supports, built from configs (never downloaded)."""

import torch


def llama(vocab, hidden=32, layers=2, tie=False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def qwen2(vocab, hidden=32, layers=2, tie=True):
    """Qwen2 as its small models have it: tied head over a plain embedding, biased q/k/v projections."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def gemma2(vocab, hidden=32, layers=2, heads=2, kv_heads=2, sliding_window=16):
    """Gemma-2 as the paper's pair has it: tied, scaled embedding, soft-capped attention and final
    logits, alternating sliding-window layers (``sliding_window`` shorter than the test sequences
    exercises them) and grouped-query attention when ``kv_heads < heads``."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                        max_position_embeddings=64, tie_word_embeddings=True, final_logit_softcapping=30.0,
                        attn_logit_softcapping=50.0, query_pre_attn_scalar=16, sliding_window=sliding_window,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)


def save_model(config, path, tokenizer, seed=1):
    """A randomly initialised model (seeded) and the tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
