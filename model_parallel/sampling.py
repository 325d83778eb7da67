"""Exact sampling over a vocabulary split across ranks, with stateless, counter-based noise.

Gumbel-max: ``argmax_v (z_v / τ + G_v)`` with ``G_v = -log(-log u_v)`` and ``u_v`` uniform on (0, 1)
is a draw from ``softmax(z / τ)``. Each rank perturbs its own slice of the logits and proposes its
best ``(score, global id)`` per row; one all-gather of those ``[B, 2]`` pairs lets every rank pick
the same winner (highest score, ties to the lower id). The logits are never gathered.

The noise ``u`` is a pure function of ``(seed, step, sequence, position, global token id)``: no RNG
state, nothing to save, so a resumed run draws bitwise the tokens a straight run draws, and the
token a row gets does not depend on how the vocabulary is sliced, nor on the batch's order or size.

The hash (documented here because resumes depend on it never changing):

- ``mix`` is Chris Wellons' "lowbias32" 32-bit integer finaliser::

      x ^= x >> 16;  x *= 0x7feb352d;  x ^= x >> 15;  x *= 0x846ca68b;  x ^= x >> 16   (mod 2**32)

  a bijection of 32-bit words. It runs in int64 tensors (or Python ints, the same function), each
  product reduced with ``& 0xFFFFFFFF``. A multiplier above 2**31 is used as ``c - 2**32`` (same
  residue mod 2**32), so every product of a 32-bit word by a multiplier stays within ±2**63: the
  arithmetic never overflows int64, and its low 32 bits are exact on any device.
- Every key is taken modulo 2**64 and enters as two 32-bit words, low then high. For each of two
  streams ``s`` (which differ by their starting constant)::

      h   = mix(STREAM[s] ^ seed_lo); h = mix(h ^ seed_hi); then step_lo, step_hi, position_lo,
            position_hi the same way                           (Python ints: once per call)
      row = mix(mix(h ^ sequence_lo) ^ sequence_hi)            ([B])
      col = mix(mix(TOKEN[s] ^ token_hi) ^ token_lo)           ([V])
      out = mix(row ^ col)                                     ([B, V])

- The 53-bit integer ``k = out_0 << 21 | out_1 >> 11`` (all of stream 0, the top 21 bits of
  stream 1) becomes ``u = k · 2**-53``, with ``k = 0`` sent to ``2**-54``: 2**53 distinct values,
  each of probability 2**-53, strictly inside (0, 1). Integer operations only up to that one exact
  conversion, so ``u`` is bitwise the same on CPU and CUDA.

The Gumbel transform (two float64 logs) is elementwise, so a draw does not depend on the layout.
Across device types the logs may differ in the last bit; tokens could then differ only where two
scores agree to ~1e-16.
"""

import torch

from model_parallel.collectives import gather_rows
from model_parallel.topk import global_argmax, rank_candidates

_MASK = 0xFFFFFFFF
# lowbias32's multipliers as int64-safe residues mod 2**32 (0x846ca68b > 2**31 becomes negative).
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - (1 << 32))
# Starting constants of the two independent streams, and of their token hashes (arbitrary, fixed forever).
_STREAMS = (0x9E3779B9, 0x85EBCA77)
_TOKENS = (0xC2B2AE3D, 0x27D4EB2F)
_KEY_LIMIT = 1 << 64


def _mix(x):
    """lowbias32 on 32-bit words held in int64 tensors or Python ints (same result for both)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & _MASK
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[1]) & _MASK
    return x ^ (x >> 16)


def _words(x):
    """(low, high) 32-bit words of an int64 tensor or a Python int taken modulo 2**64."""
    return x & _MASK, (x >> 32) & _MASK


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _scalar_key(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= value < _KEY_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _index_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {_describe(value)}")
    return value


def _stream(stream: int, scalars, sequence: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """One stream's 32-bit words ``[B, V]`` (int64 holding values in [0, 2**32))."""
    h = _STREAMS[stream]
    for key in scalars:  # seed, step, position: on the host, once per call
        for word in _words(key):
            h = _mix(h ^ word)
    sequence_lo, sequence_hi = _words(sequence)
    row = _mix(_mix(sequence_lo ^ h) ^ sequence_hi)  # (B,)
    token_lo, token_hi = _words(token_ids)
    col = _mix(_mix(token_hi ^ _TOKENS[stream]) ^ token_lo)  # (V,)
    return _mix(row.unsqueeze(1) ^ col.unsqueeze(0))  # (B, V)


def _to_unit(k: torch.Tensor) -> torch.Tensor:
    """53-bit integers ``k`` (int64) → float64 ``k · 2**-53``, with 0 sent to ``2**-54``: strictly
    inside (0, 1). Computed as ``2k · 2**-54`` (``1 · 2**-54`` for 0): even integers below 2**54
    convert to float64 exactly."""
    twice = (k << 1) | (k == 0).to(torch.int64)
    return twice.to(torch.float64) * 2.0 ** -54


def counter_uniform(seed: int, step: int, sequence: torch.Tensor, position: int,
                    token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform noise ``[B, V]`` float64, strictly inside (0, 1), 53 bits, a pure function of
    ``(seed, step, sequence[b], position, token_ids[v])`` (the hash is in the module docstring).

    ``seed``, ``step``, ``position``: ints in [0, 2**64). ``sequence`` ``[B]`` and ``token_ids``
    ``[V]``: int64 on one device, each value taken modulo 2**64; the result is on that device and
    bitwise the same on CPU and CUDA. No host sync.
    """
    scalars = [_scalar_key("seed", seed), _scalar_key("step", step), _scalar_key("position", position)]
    sequence, token_ids = _index_tensor("sequence", sequence), _index_tensor("token_ids", token_ids)
    if sequence.device != token_ids.device:
        raise ValueError(f"sequence and token_ids must be on one device, got {sequence.device} and {token_ids.device}")
    high = _stream(0, scalars, sequence, token_ids)  # (B, V) 32 bits
    low = _stream(1, scalars, sequence, token_ids) >> 11  # (B, V) 21 bits
    return _to_unit((high << 21) | low)


def _check_sampling_args(logits, temperature, start, sequence) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D floating-point tensor [B, V_local], got {_describe(logits)}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary slice (V_local = 0)")
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    _index_tensor("sequence", sequence)
    if sequence.shape[0] != logits.shape[0] or sequence.device != logits.device:
        raise ValueError(f"sequence must hold one id per row of logits on {logits.device}, got shape "
                         f"{tuple(sequence.shape)} on {sequence.device} for logits of shape {tuple(logits.shape)}")


def sample_tokens(logits: torch.Tensor, *, temperature: float, start: int, group, seed: int, step: int,
                  sequence: torch.Tensor, position: int) -> torch.Tensor:
    """One token per row, drawn from ``softmax(logits / temperature)`` over the whole vocabulary.

    ``logits`` ``[B, V_local]`` is this rank's slice, global ids ``[start, start + V_local)``;
    ``group`` is the tensor-parallel group (``None`` or size 1: the slice is the vocabulary).
    ``sequence`` ``[B]`` int64 on the logits' device names each row globally (the job passes the
    dataset index of the prompt) and ``position`` is the index of the token drawn; with ``seed`` and
    ``step`` they key the noise (:func:`counter_uniform`), so the result does not depend on the
    layout, the batch's order or a resume.

    ``temperature`` 0: the argmax (ties to the lower id, as :func:`global_argmax`). Otherwise the
    Gumbel-max draw, scored in float64: ``-inf`` logits (padded columns) never win unless the whole
    row is ``-inf`` (then the lowest id of the vocabulary, as for any tie).

    Returns ``[B]`` int64 global ids, identical on every rank of ``group``. One all-gather of
    ``[B, 2]`` per rank (float64 scores and ids, ids exact), none without a group; no host sync;
    every tensor on ``logits.device``. Every rank must call it with the same arguments but its slice.
    """
    _check_sampling_args(logits, temperature, start, sequence)
    if temperature == 0:
        return global_argmax(logits, start, group)
    vocab_local = logits.shape[1]
    token_ids = torch.arange(start, start + vocab_local, dtype=torch.int64, device=logits.device)  # (V_local,)
    gumbel = counter_uniform(seed, step, sequence, position, token_ids).log_().neg_().log_().neg_()  # (B, V_local)
    scores = gumbel.add_(logits.to(torch.float64) / temperature)  # (B, V_local)
    values, index = scores.max(dim=-1)  # first maximum: ties to the lower id within the slice
    # float64 carries ids exactly (below 2**53) next to the scores in one exchange.
    local = torch.stack([values, (index + start).to(torch.float64)], dim=1)  # (B, 2)
    gathered = gather_rows(local, group)  # (B, ranks, 2)
    ids = gathered[:, :, 1].to(torch.int64)  # (B, ranks)
    order = rank_candidates(gathered[:, :, 0], ids)  # (B, ranks) score desc, then id asc
    return ids.gather(1, order[:, :1]).squeeze(1)
