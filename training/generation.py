"""The student writes: batched generation with a KV cache, on vocabulary slices, under every ZeRO stage.

:func:`generate` continues left-padded prompts by exactly ``max_new_tokens`` tokens. There is no
early exit: a loop that stopped once every row had written EOS would read a flag back to the host
after each token; instead every row runs to the end and the caller weighs tokens after a row's
first EOS with 0 (:mod:`training.on_policy`).

- **The cache** is transformers' own: the first forward (the prompt) returns ``past_key_values``
  built for the model's config (sliding-window layers included, e.g. Gemma-2's), and each later
  forward takes one token per row. Under AutoTP each rank caches its own attention heads.
- **ZeRO-3** gathers the student's parameters once per call, not once per token: DeepSpeed's own
  ``unwrap_model_for_generation`` gathers them all and lifts the module hooks that would release
  each layer after its forward, then puts the hooks back (the next training forward re-records
  ZeRO-3's trace). The gathered student (this rank's tensor-parallel shard, whole) is held for the
  call: the planner counts it (``generation_weights``). Stages 0–2 hold it whole already.
- **Sampling** is :func:`model_parallel.sample_tokens` on each rank's logit slice: Gumbel-max with
  counter-based noise, one all-gather of each rank's best ``(value, id)`` per row, the same token on
  every tensor-parallel rank and on every layout; temperature 0 is the global argmax.

Host syncs: none of this module's own. transformers' attention-mask preparation may read a flag
when prompts are padded (SFT prompts of several lengths); text prompts pass no mask.
"""

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from model_parallel import sample_tokens
from training.models import takes_logits_to_keep
from training.step import mask_vocab_padding


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn, and the counters its noise is a function of."""

    temperature: float
    """0: greedy (the global argmax, ties to the lower id)."""
    seed: int
    step: int
    """The optimizer step the samples are for."""


@contextlib.contextmanager
def _whole_student(engine):
    """The student's parameters whole for the duration (see the module docstring)."""
    if engine.zero_optimization_stage() == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield
    else:
        yield


def _prompt_positions(prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, P]`` position ids of left-padded prompts: real tokens count from 0 (pads take 0)."""
    if prompt_mask is None:
        return torch.arange(prompt_ids.shape[1], device=prompt_ids.device).expand(prompt_ids.shape)
    return (prompt_mask.cumsum(dim=1) - 1).clamp_(min=0)


@torch.no_grad()
def generate(engine, prompt_ids: torch.Tensor, prompt_mask: Optional[torch.Tensor], *, max_new_tokens: int,
             sampling: Sampling, sequence: torch.Tensor, vocab_start: int, real_vocab_size: int,
             tp_group) -> torch.Tensor:
    """``[B, max_new_tokens]`` global token ids continuing each prompt (on the prompts' device).

    Args:
        engine: the student's DeepSpeed engine (any ZeRO stage; AutoTP or not). Its module runs in
            eval mode for the call and returns to the mode it was in.
        prompt_ids: ``[B, P]`` left-padded prompts, on the engine's device.
        prompt_mask: ``[B, P]`` 1 on real tokens, 0 on the left padding; None when no row is padded.
        sampling: temperature and the (seed, step) counters of the noise.
        sequence: ``[B]`` int64, a global id per row (the job: the prompt's dataset index); with the
            token's index in the continuation and its global id it completes the noise's counter.
        vocab_start, real_vocab_size, tp_group: this rank's slice of the head; columns at and past
            ``real_vocab_size`` are padding and never sampled.
    """
    model = engine.module
    was_training = model.training
    model.eval()
    try:
        with _whole_student(engine):
            return _decode(model, prompt_ids, prompt_mask, max_new_tokens, sampling, sequence, vocab_start,
                           real_vocab_size, tp_group)
    finally:
        model.train(was_training)


def _decode(model, prompt_ids, prompt_mask, max_new_tokens, sampling, sequence, vocab_start, real_vocab_size,
            tp_group) -> torch.Tensor:
    rows, device = prompt_ids.shape[0], prompt_ids.device
    positions = _prompt_positions(prompt_ids, prompt_mask)  # (B, P)
    next_position = positions[:, -1:] + 1  # (B, 1) the first new token's position
    mask = prompt_mask
    tokens = torch.empty((rows, max_new_tokens), dtype=torch.long, device=device)  # (B, N)
    extra = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    for index in range(max_new_tokens):
        logits = mask_vocab_padding(out.logits[:, -1], vocab_start, real_vocab_size)  # (B, V_local)
        tokens[:, index] = sample_tokens(logits, temperature=sampling.temperature, start=vocab_start, group=tp_group,
                                         seed=sampling.seed, step=sampling.step, sequence=sequence, position=index)
        if index + 1 == max_new_tokens:
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)  # (B, P + index + 1)
        out = model(input_ids=tokens[:, index:index + 1], attention_mask=mask, position_ids=next_position + index,
                    past_key_values=out.past_key_values, use_cache=True)
    return tokens


__all__ = ["Sampling", "generate"]
