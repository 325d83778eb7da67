"""Evaluation metrics on (vocabulary-sharded) logits, exact against one device.

Every function takes ``[n, V_local]`` logit slices (or the whole vocabulary with ``tp_group=None``)
laid out as in :mod:`loss`: rank r of ``tp_group`` holds the r-th contiguous slice. Results are
identical on every rank of the group. Calibration is computed from per-bin sums reduced across
ranks, never by materialising the ``n × V`` (prediction, outcome) pairs.
"""

import math
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist

from core.tokens import IGNORE_INDEX
from loss.baselines import cross_entropy, forward_kl, reverse_kl
from loss.registry import divergence
from loss.tail import tail_divergence_parts
from model_parallel import VocabShard, all_reduce_sum, gather_rows, global_argmax, resolve_vocab_shard

# Rows of softmax probabilities are binned this many logits at a time.
CHUNK_NUMEL = 1 << 22

BANDS = ("frequent", "middle", "rare")
"""Frequency bands of target tokens, in :class:`TokenBands`' index order."""
FREQUENT_SHARE = 0.5
"""``frequent``: the most frequent tokens that cover the first half of the training occurrences."""
RARE_SHARE = 0.05
"""``rare``: tokens all of whose occurrences lie in the last 5% (least frequent first), and unseen ones."""
RARE_SEQUENCE_SHARE = 0.1
"""``nll_rare_sequences``: over this share of the evaluated sequences, those richest in rare targets."""


def _global_log_normaliser(logits: torch.Tensor, group) -> torch.Tensor:
    local = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (n, 1)
    return torch.logsumexp(gather_rows(local, group)[:, :, 0], dim=1)  # (n,)


def _bin_index(probabilities: torch.Tensor, n_bins: int) -> torch.Tensor:
    # Equal-width bins of [0, 1]; the last one is closed, so p = 1 falls in bin n_bins - 1.
    return (probabilities * n_bins).long().clamp_(0, n_bins - 1)


def full_ece_bins(logits: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 10, tp_group=None,
                  ignore_index: int = IGNORE_INDEX, shard: Optional[VocabShard] = None) -> torch.Tensor:
    """``[3, n_bins]`` float64 sums over every (position, vocabulary item) pair: pair count, summed
    confidence and hits (item = next token), over the rows whose target is not ``ignore_index``.

    One all-gather of one number per row and one all-reduce of ``3·n_bins`` numbers (plus the layout
    check unless ``shard``, resolved once by the caller, is given).
    """
    if shard is None:
        shard = resolve_vocab_shard(logits.shape[-1], tp_group, caller="full_ece", device=logits.device)
    keep = targets != ignore_index
    logits, targets = logits[keep], targets[keep]
    log_z = _global_log_normaliser(logits, tp_group)
    bins = torch.zeros(3, n_bins, dtype=torch.float64, device=logits.device)
    step = max(1, CHUNK_NUMEL // max(1, shard.size))
    for start in range(0, logits.shape[0], step):
        chunk = logits[start:start + step].float()
        # Padded vocabulary columns (-inf) are not predictions: they do not count as pairs.
        real = torch.isfinite(chunk).view(-1)
        probabilities = torch.exp(chunk - log_z[start:start + step, None]).view(-1)[real]
        index = _bin_index(probabilities, n_bins)
        bins[0] += torch.bincount(index, minlength=n_bins).double()
        bins[1] += torch.bincount(index, weights=probabilities.double(), minlength=n_bins)
    local = targets - shard.start
    owned = (local >= 0) & (local < shard.size)
    hit_probabilities = torch.exp(logits[owned].float().gather(1, local[owned, None]).squeeze(1) - log_z[owned])
    bins[2] += torch.bincount(_bin_index(hit_probabilities, n_bins), minlength=n_bins).double()
    return all_reduce_sum(bins, tp_group)


def ece_from_bins(bins: torch.Tensor) -> float:
    """Σ_m (|B_m|/N)·|A_m − C_m| from ``[3, n_bins]`` (count, confidence sum, hits) sums."""
    count, confidence, hits = bins.double()
    total = count.sum()
    if total == 0:
        return 0.0
    return float(((hits - confidence).abs() / total).sum())  # |B|/N · |hits/|B| − conf/|B||; host sync


def full_ece(logits: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 10, tp_group=None,
             ignore_index: int = IGNORE_INDEX) -> float:
    """Full-ECE (Liu et al. 2024, arXiv 2406.11345): every (position, vocabulary item) pair is a
    prediction with confidence q and outcome 1[item = next token], binned into ``n_bins``
    equal-width bins of [0, 1]; Full-ECE = Σ_m (|B_m|/N)·|A_m − C_m|, N the number of pairs."""
    return ece_from_bins(full_ece_bins(logits, targets, n_bins=n_bins, tp_group=tp_group,
                                       ignore_index=ignore_index))


def top1_ece_bins(logits: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 10, tp_group=None,
                  ignore_index: int = IGNORE_INDEX, shard: Optional[VocabShard] = None) -> torch.Tensor:
    """``[3, n_bins]`` sums for the usual top-1 ECE: per position, confidence max_j q_j and hit
    argmax = target. ``shard``: as for :func:`full_ece_bins`."""
    if shard is None:
        shard = resolve_vocab_shard(logits.shape[-1], tp_group, caller="top1_ece", device=logits.device)
    keep = targets != ignore_index
    logits, targets = logits[keep], targets[keep]
    log_z = _global_log_normaliser(logits, tp_group)
    local_max = logits.float().amax(dim=-1, keepdim=True)
    confidence = torch.exp(gather_rows(local_max, tp_group)[:, :, 0].amax(dim=1) - log_z)
    hits = (global_argmax(logits, shard.start, tp_group) == targets).double()
    index = _bin_index(confidence, n_bins)
    return torch.stack([torch.bincount(index, minlength=n_bins).double(),
                        torch.bincount(index, weights=confidence.double(), minlength=n_bins),
                        torch.bincount(index, weights=hits, minlength=n_bins)])


class TokenBands(NamedTuple):
    """What :func:`frequency_bands` returns."""

    band: torch.Tensor
    """``[V]`` int64: each token id's index in :data:`BANDS`."""
    summary: dict
    """The thresholds: tokens per band, unseen tokens, the counts at the boundaries, the shares."""


def frequency_bands(counts, vocab_size: int = 0) -> TokenBands:
    """Split the vocabulary by training counts (``[V']`` non-negative; ids up to ``vocab_size`` that
    ``counts`` does not reach count 0), scale-free: sort ids by count, most frequent first; the
    ``frequent`` threshold is the count of the last id reached while fewer than :data:`FREQUENT_SHARE`
    of all occurrences precede it, the ``rare`` threshold the count of the first id preceded by at
    least ``1 - RARE_SHARE`` of them. An id's band follows from its count alone (ids of equal count
    share a band, whatever their numbering): ``frequent`` at or above the first threshold (the most
    frequent id always), ``rare`` at or below the second (every unseen id), ``middle`` the rest."""
    # On the host: the counts are a corpus statistic read once per evaluation (EvalSums moves the bands).
    counts = torch.as_tensor(counts, dtype=torch.float64, device="cpu").flatten()
    counts = torch.nn.functional.pad(counts, (0, max(0, vocab_size - counts.numel())))
    total = float(counts.sum())
    if total <= 0 or bool((counts < 0).any()):
        raise ValueError(f"frequency_bands: need non-negative counts with a positive total, got total {total:g}")
    ordered = torch.sort(counts, descending=True).values
    before = torch.cumsum(ordered, 0) - ordered  # occurrences of more frequent ids; exact below 2^53
    frequent_min = ordered[before < FREQUENT_SHARE * total].min()  # the first id always qualifies
    rare_ids = before >= (1 - RARE_SHARE) * total
    rare_max = ordered[rare_ids].max() if bool(rare_ids.any()) else -1.0
    band = torch.ones(counts.shape, dtype=torch.int64, device="cpu")
    band[counts <= rare_max] = 2
    band[counts >= frequent_min] = 0
    summary = {f"{name}_tokens": int((band == index).sum()) for index, name in enumerate(BANDS)}
    summary.update(unseen_tokens=int((counts == 0).sum()), frequent_share=FREQUENT_SHARE, rare_share=RARE_SHARE,
                   frequent_min_count=int(counts[band == 0].min()), rare_max_count=int(counts[band == 2].max())
                   if bool((band == 2).any()) else None, training_tokens=int(total))
    return TokenBands(band, summary)


def _exp(value: float) -> float:
    return math.inf if value > 709 else math.exp(value)  # e^709 is the largest finite double


def objective_metrics(out: Dict[str, torch.Tensor], *, kind: str, beta: float, temperature: float) -> dict:
    """The evaluation metrics (:class:`EvalSums`' names, for its ``known``) that the training
    objective's output ``out`` (:func:`loss.objective.distillation_objective` with ``kind`` and
    ``temperature``, plus the argmaxes) already holds: the argmaxes always; ``nll`` where the
    cross-entropy was part of the loss; at temperature 1 the metrics the divergence's outputs are
    (:attr:`loss.registry.Divergence.metrics`, with the metric's constant ``beta``). EvalSums
    computes everything else."""
    known = {name: out[name] for name in ("student_top1", "teacher_top1") if name in out}
    if "ce" in out:
        known["nll"] = out["ce"]
    if temperature == 1.0:
        known.update(divergence(kind).metrics(out, beta))
    return known


class EvalResult(NamedTuple):
    """What :meth:`EvalSums.reduce` returns."""

    scalars: Dict[str, float]
    """Means over tokens, perplexities, ECEs and the token count; with bands also ``nll_<band>``
    (NaN where the band has no position), ``tokens_<band>``, ``full_ece_rare`` and
    ``nll_rare_sequences`` (NaN without rare targets) with ``rare_sequences``, how many it averages."""
    bins: Dict[str, List[List[float]]]
    """The calibration bins for reliability diagrams: ``{"full": ..., "top1": ...}`` (and ``"full_rare"``
    with bands), each ``[3, n_bins]`` (pair count, summed confidence, hits)."""


class EvalSums:
    """Accumulates per-token sums and calibration bins over batches, then reduces and reports.

    ``add(student, teacher, targets, known)`` takes the valid positions only (``[n, V_local]``
    slices) and, in ``known``, per-token values the caller already has (e.g. from the training
    objective, :func:`objective_metrics`: ``nll``, ``student_top1``, ``teacher_top1``,
    ``tail_divergence``, ``forward_kl``, ``reverse_kl``, ``teacher_tail_mass``,
    ``student_tail_mass``); only the others are computed. Everything stays on ``device`` (the
    logits' device) until :meth:`reduce` (or :meth:`result`), the one host sync.
    ``shard``: this rank's vocabulary slice, resolved once by the caller (the job's engines); None:
    the layout is checked collectively on every :meth:`add`.

    ``bands`` (:attr:`TokenBands.band`, covering every target id) adds the tail metrics: NLL per
    band of the target, Full-ECE over the positions whose target is rare (every vocabulary item of
    those positions) and, where the caller numbers sequences (:meth:`start_batch`, ``sequence_ids``),
    ``nll_rare_sequences``.
    """

    def __init__(self, *, top_k: int, beta: float, n_bins: int = 10, tp_group=None, device="cpu",
                 shard: Optional[VocabShard] = None, bands: Optional[torch.Tensor] = None):
        self.top_k, self.beta, self.n_bins, self.tp_group, self.shard = top_k, beta, n_bins, tp_group, shard
        self.device = torch.device(device)
        self.sums = {}
        self.full_bins = torch.zeros(3, n_bins, dtype=torch.float64, device=self.device)
        self.top1_bins = torch.zeros(3, n_bins, dtype=torch.float64, device=self.device)
        self.bands = None if bands is None else bands.to(self.device, torch.long)
        self.rare_bins = torch.zeros(3, n_bins, dtype=torch.float64, device=self.device)
        self.sequences: List[torch.Tensor] = []  # per batch: [rows, 3] (NLL sum, targets, rare targets)

    def start_batch(self, num_rows: int) -> None:
        """A batch of ``num_rows`` sequences begins: :meth:`add`'s ``sequence_ids`` (``[n]``, each
        position's row in ``[0, num_rows)``) refer to it until the next call. Only with ``bands``."""
        if self.bands is not None:
            self.sequences.append(torch.zeros(num_rows, 3, dtype=torch.float64, device=self.device))

    def add_sum(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` (summed over its tokens) to the per-token sum ``name``."""
        total = value.detach().double().sum()
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    @torch.no_grad()
    def add(self, student: torch.Tensor, teacher, targets: torch.Tensor, known=None, sequence_ids=None) -> None:
        group, known = self.tp_group, dict(known or {})
        shard = self.shard or resolve_vocab_shard(student.shape[-1], group, caller="EvalSums", device=student.device)
        start = shard.start

        def value(name, compute):
            if name not in known:
                known[name] = compute()
            return known[name]

        if teacher is not None and not {"tail_divergence", "teacher_tail_mass", "student_tail_mass"} <= set(known):
            # One pass gives the tail metrics and, as by-products, both models' argmax.
            parts, top1 = tail_divergence_parts(student, teacher, top_k=self.top_k, tp_group=group, return_top1=True,
                                                shard=self.shard)
            value("tail_divergence", lambda: parts.divergence(self.beta))
            value("teacher_tail_mass", lambda: parts.teacher_tail_mass)
            value("student_tail_mass", lambda: parts.student_tail_mass)
            value("student_top1", lambda: top1.student)
            if top1.teacher is not None:
                value("teacher_top1", lambda: top1.teacher)
        student_top1 = value("student_top1", lambda: global_argmax(student, start, group))
        self.add_sum("tokens", torch.ones_like(targets, dtype=torch.float64))
        self.add_sum("nll", value("nll", lambda: cross_entropy(student, targets, tp_group=group, shard=self.shard)))
        self.add_sum("accuracy", student_top1 == targets)
        self.full_bins += full_ece_bins(student, targets, n_bins=self.n_bins, tp_group=group, shard=shard)
        self.top1_bins += top1_ece_bins(student, targets, n_bins=self.n_bins, tp_group=group, shard=shard)
        if self.bands is not None:
            self._add_bands(student, targets, known["nll"], sequence_ids, shard)
        if teacher is None:
            return
        teacher_top1 = value("teacher_top1", lambda: global_argmax(teacher, start, group))
        for name, compute in (("forward_kl", lambda: forward_kl(student, teacher, tp_group=group)),
                              ("reverse_kl", lambda: reverse_kl(student, teacher, tp_group=group)),
                              ("teacher_nll", lambda: cross_entropy(teacher, targets, tp_group=group))):
            value(name, compute)
        for name in ("forward_kl", "reverse_kl", "tail_divergence", "teacher_tail_mass", "student_tail_mass",
                     "teacher_nll"):
            self.add_sum(name, known[name])
        self.add_sum("top1_agreement", student_top1 == teacher_top1)

    def _add_bands(self, student, targets, nll, sequence_ids, shard) -> None:
        band = self.bands[targets]  # (n,)
        nll = nll.detach().double()
        for index, name in enumerate(BANDS):
            hit = band == index
            self.add_sum(f"tokens_{name}", hit)
            self.add_sum(f"nll_{name}", torch.where(hit, nll, 0.0))
        rare = band == BANDS.index("rare")
        # The same Full-ECE with every other position ignored: the same rows on every rank of the group.
        self.rare_bins += full_ece_bins(student, torch.where(rare, targets, IGNORE_INDEX), n_bins=self.n_bins,
                                        tp_group=self.tp_group, shard=shard)
        if sequence_ids is not None:
            if not self.sequences:
                raise ValueError("EvalSums.add: sequence_ids given before start_batch")
            per_token = torch.stack([nll, torch.ones_like(nll), rare.double()], dim=1)  # (n, 3)
            self.sequences[-1].index_add_(0, sequence_ids, per_token)

    def _rare_sequences(self, dp_group) -> dict:
        """``nll_rare_sequences``: the token-weighted mean NLL of the :data:`RARE_SEQUENCE_SHARE` of
        sequences (at least one; those with a target, over ``dp_group``) with the largest share of
        rare targets (ties: in evaluation order); NaN without any rare target. Two all-gathers, on
        every rank of ``dp_group`` (each given the bands), whether or not it evaluated a batch."""
        local = torch.cat(self.sequences) if self.sequences else torch.zeros(0, 3, dtype=torch.float64,
                                                                               device=self.device)
        local = local[local[:, 1] > 0]
        if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            size = torch.tensor([[float(local.shape[0])]], dtype=torch.float64, device=self.device)
            sizes = [int(n) for n in gather_rows(size, dp_group)[0, :, 0].tolist()]  # host sync
            padded = torch.zeros(max(sizes), 3, dtype=torch.float64, device=self.device)
            padded[:local.shape[0]] = local
            gathered = gather_rows(padded, dp_group)  # (max(sizes), ranks, 3)
            local = torch.cat([gathered[:n, rank] for rank, n in enumerate(sizes)])
        local = local.cpu()
        if not bool((local[:, 2] > 0).any()):
            return {"nll_rare_sequences": math.nan, "rare_sequences": 0}
        count = max(1, math.ceil(RARE_SEQUENCE_SHARE * local.shape[0]))
        richest = torch.sort(local[:, 2] / local[:, 1], descending=True, stable=True).indices[:count]
        chosen = local[richest]
        return {"nll_rare_sequences": float(chosen[:, 0].sum() / chosen[:, 1].sum()), "rare_sequences": count}

    def result(self, dp_group=None) -> dict:
        """:meth:`reduce`'s scalars only."""
        return self.reduce(dp_group).scalars

    def reduce(self, dp_group=None) -> EvalResult:
        """Means over tokens, perplexity and ECEs, and the calibration bins they come from, summed over
        ``dp_group`` first (if given): one all-reduce and one host sync (with bands and numbered
        sequences, :meth:`_rare_sequences`' two all-gathers and one sync more). Leaves the sums as they are."""
        names = sorted(self.sums)
        bins = {"full": self.full_bins, "top1": self.top1_bins}
        if self.bands is not None:
            bins["full_rare"] = self.rare_bins
        packed = torch.cat([self.sums[name].view(1) for name in names] + [b.view(-1) for b in bins.values()])
        if dp_group is not None and dist.is_initialized():
            all_reduce_sum(packed, dp_group)
        packed = packed.cpu()  # host sync: the evaluation's results, once
        sums = dict(zip(names, packed[:len(names)].tolist()))
        bins = dict(zip(bins, packed[len(names):].view(len(bins), 3, self.n_bins)))
        tokens = max(sums.pop("tokens", 0.0), 1.0)
        band_tokens = {name: sums.pop(f"tokens_{name}") for name in BANDS if f"tokens_{name}" in sums}
        # A band's NLL is a mean over that band's positions; NaN where it has none.
        out = {name: value / (band_tokens.get(name.removeprefix("nll_"), tokens) or math.nan)
               for name, value in sums.items()}
        out["perplexity"] = _exp(out.get("nll", float("nan")))
        if "teacher_nll" in out:
            out["teacher_perplexity"] = _exp(out["teacher_nll"])
        out["full_ece"] = ece_from_bins(bins["full"])
        out["top1_ece"] = ece_from_bins(bins["top1"])
        if self.bands is not None:
            out["full_ece_rare"] = ece_from_bins(bins["full_rare"]) if band_tokens.get("rare") else math.nan
            # Every rank (its bands given) joins the gathers, batches or none: a gate on its own rows could hang the rest.
            out.update(self._rare_sequences(dp_group))
            out.update({f"tokens_{name}": count for name, count in band_tokens.items()})
        out["tokens"] = tokens
        return EvalResult(out, {name: value.tolist() for name, value in bins.items()})
