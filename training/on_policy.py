"""On-policy distillation (GKD): on some steps the student writes the continuations, the teacher
scores them, and the loss is taken on the student's own tokens.

Per optimizer step the job asks :func:`is_on_policy` (λ = ``on_policy.fraction``, drawn from
(seed, step) by a hash: no state, so a resumed run draws what a straight one did). On an on-policy
step, each of the step's data micro-batches gives its prompts (:func:`prompts`): the first
``prompt_tokens`` of each text block, or an SFT row's own prompt. The student continues them by
exactly ``max_new_tokens`` (:func:`training.generation.generate`), and :func:`scored_micro_batch`
lays prompt + continuation out as the step's right-padded rows, as an SFT row would be: the loss
on the continuation (and on the prompt with ``loss_on_prompt``), each continuation counted up to
and including its first EOS. Which tokens follow an EOS only the device knows, so they are not cut
out (that would need their count on the host) but weighed 0 (:attr:`training.step.Positions.weights`);
the step's token normaliser sums the weights on the device. The same ``train_step`` then runs the
teacher's and the student's forwards on the scored rows, for every loss kind and both head paths.
"""

import hashlib
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from core.errors import ConfigError
from core.tokens import IGNORE_INDEX
from training.generation import Sampling, generate
from training.step import MicroBatch, Positions, positions_from_labels


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` is on-policy: ``u(seed, step) < fraction``, ``u`` uniform in
    [0, 1) from a hash of the two (the same on every rank and on every resume; 0 never, 1 always)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"on_policy/{seed}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def check_data(on_policy, manifest: dict, key: str = "data.train") -> None:
    """Refuse, by name, data the on-policy step cannot prompt from (a no-op at λ = 0)."""
    if on_policy.fraction == 0:
        return
    seq_len, fmt = int(manifest["seq_len"]), manifest.get("format", "text")
    if fmt == "sft" and manifest.get("packed"):
        raise ConfigError(f"{key}: packed SFT rows hold several prompts each; on_policy.fraction > 0 needs one "
                          f"prompt per row (prepare the data without --pack)")
    if fmt == "sft" and on_policy.max_new_tokens >= seq_len:
        raise ConfigError(f"on_policy.max_new_tokens: must be < the data's sequence length {seq_len} "
                          f"(leaving room for a prompt), got {on_policy.max_new_tokens}")
    if fmt != "sft" and on_policy.prompt_tokens + on_policy.max_new_tokens > seq_len:
        raise ConfigError(f"on_policy.prompt_tokens + on_policy.max_new_tokens: must be <= the data's sequence "
                          f"length {seq_len}, got {on_policy.prompt_tokens} + {on_policy.max_new_tokens}")


@dataclass
class Prompts:
    """One micro-batch's prompts, on the host, left-padded for generation."""

    ids: torch.Tensor
    """``[B, P]`` token ids, each prompt at the right end of its row."""
    mask: Optional[torch.Tensor]
    """``[B, P]`` 1 on prompt tokens, 0 on the padding; None when no row is padded."""
    lengths: List[int]
    """Each prompt's length (``<= P``)."""


def prompts(host_batch: dict, on_policy, *, sft: bool, seq_len: int, pad_token_id: int) -> Prompts:
    """The prompts of a data micro-batch (:class:`data.loader.Collator`'s): a text block's first
    ``prompt_tokens``; an SFT row's tokens before its first label, at most ``seq_len −
    max_new_tokens`` of them (the end, next to the response, as ``data.prepare`` truncates)."""
    ids, labels = host_batch["input_ids"], host_batch["labels"]
    if sft:
        room = seq_len - on_policy.max_new_tokens
        starts = [int(row.nonzero()[0, 0]) if bool(row.any()) else len(row)  # host: the data's own labels
                  for row in labels != IGNORE_INDEX]
        rows = [ids[i, max(0, start - room):start] for i, start in enumerate(starts)]
    else:
        rows = [ids[i, :on_policy.prompt_tokens] for i in range(ids.shape[0])]
    lengths = [len(row) for row in rows]
    if min(lengths) == 0:
        raise ConfigError(f"on_policy: an SFT row of this batch has no prompt (its first token is labelled); "
                          f"rows {[i for i, n in enumerate(lengths) if n == 0]} cannot be continued")
    width = max(lengths)
    left = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, row in enumerate(rows):
        left[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return Prompts(ids=left, mask=None if min(lengths) == width else mask, lengths=lengths)


def _layout(prompt: Prompts, new_tokens: int, loss_on_prompt: bool):
    """The scored rows' layout, on the host: ``(index, pad, labels)``, each ``[B, P + N]``.
    ``index``: where each scored position reads from ``cat(prompt.ids, continuation)``; ``pad``:
    positions past a row's end; ``labels``: 0 where the loss is taken (a stand-in id), else -100."""
    rows, width = len(prompt.lengths), prompt.ids.shape[1]
    length = width + new_tokens
    column = torch.arange(length, device="cpu").expand(rows, length)  # (B, L)
    lengths = torch.tensor(prompt.lengths, device="cpu").unsqueeze(1)  # (B, 1)
    pad = column >= lengths + new_tokens
    index = (column + (width - lengths)).clamp_(max=length - 1)
    in_continuation = (column >= lengths) & ~pad
    counted = in_continuation | (column < lengths) if loss_on_prompt else in_continuation
    labels = torch.where(counted, 0, IGNORE_INDEX)
    return index, pad, labels


def _up_to_eos(continuation: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B, N]`` bool: the continuation's tokens up to and including its first EOS (all where none)."""
    is_eos = continuation == eos_token_id  # (B, N)
    return (is_eos.cumsum(dim=1) - is_eos.long()) == 0


def scored_micro_batch(prompt: Prompts, continuation: torch.Tensor, *, eos_token_id: int, pad_token_id: int,
                       loss_on_prompt: bool) -> MicroBatch:
    """Prompt + continuation as the step's right-padded rows, on the continuation's device.

    ``continuation``: ``[B, N]`` generated ids. Targets are the scored rows' own next tokens; each
    token's weight is 1 on the prompt and on the continuation up to and including its first EOS,
    0 after it. Tokens of weight 0 get sequence ids of their own (``rows + B``), so a per-sequence
    mean (``beta_mode: sequence``) sees only counted tokens."""
    device, (rows, new_tokens) = continuation.device, continuation.shape
    index, pad, labels = _layout(prompt, new_tokens, loss_on_prompt)
    where = positions_from_labels(labels)  # host: the layout does not depend on what was generated
    index, pad = index.to(device), pad.to(device)
    joined = torch.cat([prompt.ids.to(device), continuation], dim=1)  # (B, P + N) left-padded
    input_ids = torch.where(pad, pad_token_id, joined.gather(1, index))  # (B, L) right-padded
    weight_of = torch.cat([torch.ones_like(prompt.ids, dtype=torch.bool, device=device),
                           _up_to_eos(continuation, eos_token_id)], dim=1)  # (B, P + N)
    weight_of = weight_of.gather(1, index) & ~pad  # (B, L)
    where = where.to(device)
    weights = _selected(weight_of[:, 1:], where.keep, where.select).float()  # (n,) each target's weight
    targets = _selected(input_ids[:, 1:], where.keep, where.select)  # (n,)
    sequences = where.rows + rows * (weights == 0).long()  # (n,)
    return MicroBatch(input_ids=input_ids,
                      positions=Positions(keep=where.keep, select=where.select, targets=targets, rows=sequences,
                                          tokens=where.tokens, weights=weights, num_sequences=2 * rows))


def _selected(table: torch.Tensor, keep: torch.Tensor, select: Optional[torch.Tensor]) -> torch.Tensor:
    """``[n]``: ``table``'s (``[B, L−1]``) entries at the kept columns and selected rows, as the step
    selects logits (row-major over ``[B, k]``)."""
    flat = table.index_select(1, keep).reshape(-1)
    return flat if select is None else flat.index_select(0, select)


@dataclass
class Generation:
    """What one on-policy step generated, for the step and the logs."""

    micro_batches: List[MicroBatch]
    seconds: float
    """Wall time of the generation (with a device sync at its end where ``timed``)."""
    lengths: torch.Tensor
    """0-dim float64 on the device: continuation tokens counted (up to and including EOS), summed."""
    eos: torch.Tensor
    """0-dim float64 on the device: continuations that wrote an EOS."""
    sequences: int
    """Continuations written on this rank."""


def generate_micro_batches(engines, cfg, host_batches: Sequence[dict], sample_ids: Sequence[Sequence[int]], step: int,
                           *, sft: bool, seq_len: int, timed: bool) -> Generation:
    """The on-policy step's micro-batches: ``host_batches``' prompts continued by the student.

    ``sample_ids``: each micro-batch's dataset indices (the noise's sequence ids, so that a row's
    samples do not depend on the layout). ``timed``: synchronise the device once at the end so that
    ``seconds`` is the generation's own time (logging steps); otherwise it is the host's."""
    started = time.perf_counter()
    device, tokenizer, on_policy = engines.device, engines.tokenizer, cfg.on_policy
    sampling = Sampling(temperature=on_policy.temperature, seed=cfg.seed, step=step)
    batches = []
    lengths = torch.zeros((), dtype=torch.float64, device=device)
    eos = torch.zeros((), dtype=torch.float64, device=device)
    for host_batch, ids in zip(host_batches, sample_ids):
        prompt = prompts(host_batch, on_policy, sft=sft, seq_len=seq_len, pad_token_id=tokenizer.pad_token_id)
        sequence = torch.tensor(list(ids), dtype=torch.long, device="cpu").to(device)  # (B,)
        continuation = generate(engines.student, prompt.ids.to(device),
                                None if prompt.mask is None else prompt.mask.to(device),
                                max_new_tokens=on_policy.max_new_tokens, sampling=sampling, sequence=sequence,
                                vocab_start=engines.vocab_start, real_vocab_size=engines.real_vocab_size,
                                tp_group=engines.tp_group)  # (B, N)
        lengths = lengths + _up_to_eos(continuation, tokenizer.eos_token_id).sum(dtype=torch.float64)
        eos = eos + (continuation == tokenizer.eos_token_id).any(dim=1).sum(dtype=torch.float64)
        batches.append(scored_micro_batch(prompt, continuation, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id,
                                          loss_on_prompt=on_policy.loss_on_prompt))
    if timed and device.type != "cpu":
        torch.accelerator.synchronize(device)  # host sync: gen/seconds times the generation, not its launch
    return Generation(micro_batches=batches, seconds=time.perf_counter() - started, lengths=lengths, eos=eos,
                      sequences=sum(len(ids) for ids in sample_ids))


__all__ = ["Generation", "Prompts", "check_data", "generate_micro_batches", "is_on_policy", "prompts",
           "scored_micro_batch"]
