"""One layout's estimate: its memory, traffic and time (:mod:`~training.plan.memory`,
:mod:`~training.plan.traffic`, :mod:`~training.plan.timing`) and whether it fits, with the
assumptions every figure rests on (:data:`ASSUMPTIONS`)."""

from dataclasses import dataclass, replace
from typing import Dict, Iterable, Optional

from training.plan.inputs import GB, Cluster, Job, Layout
from training.plan.memory import (CUDA_CONTEXT_GB, NCCL_CHANNELS, NCCL_GB_PER_COMMUNICATOR, SAMPLER_BYTES_PER_LOGIT,
                                  memory_per_gpu, phase_overlap, runtime_reserve)
from training.plan.timing import FIXED_COSTS, SAMPLE_OPS, step_seconds
from training.plan.traffic import traffic_per_step

# A layout fits when its planned peak and that reserve leave this share of the GPU free: room for
# the caching allocator's fragmentation and for what the plan does not count.
HEADROOM = 0.10

ASSUMPTIONS = (
    "pre-training batches: every position has a target (SFT rows with masked prompts need less for logits)",
    "tensor-parallel groups sit inside a node (consecutive ranks); data-parallel groups span the nodes",
    "a data-parallel collective that crosses nodes shares the node's InfiniBand among its GPUs; "
    "within a node it runs at the NVLink figure",
    "ring collectives: an all-reduce puts 2(n-1)/n of its input on the wire, a reduce-scatter (n-1)/n, "
    "an all-gather (n-1) times its input",
    "no overlap of communication with compute (an upper bound on the step time)",
    f"a layout fits when its peak (and on CUDA the context and NCCL buffers) leaves {HEADROOM:.0%} of the "
    f"GPU free, for allocator fragmentation and what the plan does not count",
    "compute at the given achieved dense throughput for every matmul, attention included",
    "fixed per-step costs: collectives x latency + ops that scale with the parameter tensors x launch "
    "overhead + host syncs + ZeRO-3's module hooks, counted per layout (training.plan.timing.fixed_events) "
    "and priced per device type (FIXED_COSTS: CUDA from published figures, CPU measured on gloo)",
    "AutoTP shards the decoder layers' linear layers and the LM head; embeddings and norms are replicated; "
    "a tied head with a scaled embedding (Gemma-2) is untied at tensor_parallel > 1",
    "activations: what autograd saves for backward per decoder layer and token, by the model's own ops "
    "(norms that save fp32, eager attention's fp32 softmax and soft-capping, gated MLPs; held by "
    "tests/test_saved_bytes.py to 10% of counted bytes); sdpa as torch's flash kernel saves it "
    "(q, k, v, output, fp32 log-sum-exp: no [seq, seq] tensor), on CPU and on CUDA alike",
    "the teacher's no-grad forward temporaries are added to the student's activations (an upper bound: "
    "they are freed before the student's forward)",
    f"on CUDA, outside the planned peak (max_memory_allocated) but inside the GPU's memory: the CUDA "
    f"context, {CUDA_CONTEXT_GB:g} GB, and NCCL's buffers, {NCCL_GB_PER_COMMUNICATOR:g} GB per "
    f"communicator (NCCL_BUFFSIZE 4 MiB x 2 peers x {NCCL_CHANNELS} channels, with the LL and LL128 "
    f"buffers); estimates, not measured here (allocator fragmentation goes in the headroom)",
)

# Listed only where the job is on-policy (on_policy.fraction > 0): an off-policy plan is unchanged.
ON_POLICY_ASSUMPTIONS = (
    "on-policy: a generating step (probability on_policy.fraction) first generates, per micro-batch, "
    "max_new_tokens N for the micro-batch's prompts of P tokens (text blocks: on_policy.prompt_tokens; SFT rows: the "
    "bound seq_len - N; the format from the prepared data's manifest, else data.format), then trains as an off-policy step does; its training "
    "figures are the off-policy step's over seq_len tokens (a bound: it trains on P + N)",
    "on-policy memory: one micro-batch's generation at a time: its KV cache at P + N positions (transformers' "
    "DynamicCache as the model builds it: a sliding-window layer keeps window - 1 positions), under student "
    "ZeRO-3 the whole tensor-parallel shard gathered once per call, and the prefill's no-grad temporaries "
    "(its head's logits at the last position, or at every prompt position for a model without logits_to_keep) "
    "with the sampler's "
    f"({SAMPLER_BYTES_PER_LOGIT} bytes per [B, V_local] logit, counted on CPU); generation ends before the step's "
    "forwards, so the peak holds the larger of its transients and the training phase's, not both",
    "on-policy time: generation_s = fraction x grad_accum x (prefill at the achieved throughput + N decode "
    "steps (N counted: the first token comes from the prefill, a bound) + under ZeRO-3 one gather of the "
    "student per call); a decode step takes the longer of the device (max of its matmuls at the achieved "
    "throughput and its reads of the weights and the whole KV cache at hbm_gbps, plus a tensor-parallel "
    "all-reduce per row-parallel linear and the sampler's all-gather at the collective latency) and the host (its ops' "
    f"launches, training.plan.timing.decode_ops + {SAMPLE_OPS} for the sampler, at the op price); ZeRO-3's "
    "module hooks are lifted for the call (unwrap_model_for_generation), not counted; generation's collectives are in "
    "generation_s, not in the traffic kinds; estimates, not measured",
)


def assumptions(job_on_policy: bool) -> tuple:
    """:data:`ASSUMPTIONS`, and :data:`ON_POLICY_ASSUMPTIONS` for an on-policy job."""
    return ASSUMPTIONS + (ON_POLICY_ASSUMPTIONS if job_on_policy else ())


@dataclass
class Estimate:
    """One layout's plan: bytes per GPU (``memory``), bytes per step per GPU (``traffic``), seconds."""

    layout: Layout
    memory: Dict[str, float]
    traffic: Dict[str, float]
    seconds: Dict[str, float]
    """Time per step of compute and of each traffic kind."""
    rejected: Optional[str] = None
    reserve: float = 0.0
    """Bytes per GPU outside the planned peak: the CUDA context and NCCL's buffers (0 on CPU)."""
    overlap: float = 0.0
    """Bytes ``memory`` counts in both an on-policy step's phases though they are never alive at once
    (:func:`~training.plan.memory.phase_overlap`; 0 off-policy)."""

    @property
    def peak_memory_bytes(self) -> float:
        """The terms' sum, less what the two phases of an on-policy step take turns holding."""
        return sum(self.memory.values()) - self.overlap

    @property
    def step_time_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def bottleneck(self) -> str:
        return max(self.seconds, key=self.seconds.get)

    @property
    def fits(self) -> bool:
        return self.rejected is None


def _memory_problem(result: Estimate, cluster: Cluster) -> Optional[str]:
    """Why ``result`` does not fit in ``cluster``'s GPUs with :data:`HEADROOM` to spare, or None."""
    needed = result.peak_memory_bytes + result.reserve
    if needed <= (1 - HEADROOM) * cluster.gpu_memory_gb * GB:
        return None
    with_reserve = f" with {result.reserve / GB:.1f} GB of CUDA context and NCCL buffers" if result.reserve else ""
    return (f"needs {needed / GB:.1f} GB per GPU{with_reserve}, more than {1 - HEADROOM:.0%} of the "
            f"{cluster.gpu_memory_gb:g} GB usable")


def estimate(job: Job, layout: Layout, cluster: Cluster, *, device_type: str = "cuda") -> Estimate:
    """Memory, traffic and time of ``layout`` for ``job`` on ``cluster`` (see :data:`ASSUMPTIONS`);
    ``rejected`` says why it does not fit, where it does not."""
    dp = cluster.world_size // layout.tensor_parallel
    moved = traffic_per_step(job, layout, cluster)
    memory = memory_per_gpu(job, layout, cluster, device_type=device_type)
    result = Estimate(layout=layout, memory=memory, traffic=moved,
                      seconds=step_seconds(job, layout, cluster, moved, device_type=device_type),
                      reserve=runtime_reserve(layout.tensor_parallel, dp) if device_type == "cuda" else 0.0,
                      overlap=phase_overlap(job, layout, cluster, memory))
    result.rejected = _memory_problem(result, cluster)
    return result


def fastest_stage(job: Job, layout: Layout, cluster: Cluster, stages: Iterable[int], *,
                  device_type: str = "cuda") -> Optional[Estimate]:
    """The estimate of ``layout`` at the student ZeRO stage, of ``stages``, that fits and is planned
    fastest (ties, within 0.1%, to the lower stage), or None where none fits. ``device_type`` picks
    the fixed costs (:data:`~training.plan.timing.FIXED_COSTS`)."""
    if device_type not in FIXED_COSTS:
        raise ValueError(f"no fixed costs for device type {device_type!r}; known: {', '.join(FIXED_COSTS)}")
    fitting = [e for e in (estimate(job, replace(layout, student_zero_stage=s), cluster, device_type=device_type)
                           for s in stages) if e.fits]
    return min(fitting, key=lambda e: (round(e.step_time_s / min(x.step_time_s for x in fitting), 3),
                                       e.layout.student_zero_stage), default=None)
