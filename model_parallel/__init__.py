"""Tensor-parallel plumbing for vocabulary-sharded logits.

Everything here is a no-op without a process group (``None`` or a group of size 1), so the same
loss code runs on one device and on a vocabulary split over tensor-parallel ranks.

The instruments tests and benchmarks measure it with (device discipline, collective bytes, live
memory) are in :mod:`model_parallel.testing`, which the training job never imports.
"""

from model_parallel.collectives import all_reduce_sum, gather_rows, group_rank, is_parallel, start_all_reduce_sum
from model_parallel.layout import VocabShard, resolve_vocab_shard
from model_parallel.sampling import counter_uniform, sample_tokens
from model_parallel.topk import global_argmax, local_topk, rank_candidates

__all__ = [
    "VocabShard",
    "all_reduce_sum",
    "counter_uniform",
    "gather_rows",
    "global_argmax",
    "group_rank",
    "is_parallel",
    "local_topk",
    "rank_candidates",
    "resolve_vocab_shard",
    "sample_tokens",
    "start_all_reduce_sum",
]
