"""The time model: seconds per optimizer step of compute, of each traffic kind and of the step's
fixed costs, without overlap (an upper bound). Compute runs at the cluster's achieved dense
throughput; each kind's bytes go on the wire with its ring algorithm's factor (:func:`wire_factors`)
over its link (:data:`TP_KINDS` on NVLink, the rest on the data-parallel link); ``fixed`` counts the
events whose cost does not scale with bytes or FLOPs (:func:`fixed_events`) at a per-device price
each (:data:`FIXED_COSTS`). Without it ZeRO stages 0-2 move the same bytes and tie, and a small job,
whose step is mostly such events, is planned as if it were free. An on-policy job adds
``generation`` (:func:`generation_seconds`): the student's generation, expected over λ."""

import math
from dataclasses import dataclass
from typing import Dict

from training.plan.inputs import GB, Cluster, Job, Layout
from training.plan.memory import ds_bucket, kv_cache_bytes
from training.plan.shape import ModelShape
from training.plan.traffic import TRAFFIC_KINDS

# Collectives inside a tensor-parallel group, which sits inside a node.
TP_KINDS = ("tp_allreduce", "loss_exchange")


def wire_factors(tp: int, dp: int) -> Dict[str, float]:
    """Bytes on the wire per byte handed in, by kind: an all-gather puts (n-1) times its input on the
    wire, a reduce-scatter (n-1)/n, an all-reduce 2(n-1)/n; the loss exchange is an all-gather."""
    return {"teacher_gather": dp - 1, "student_gather": dp - 1, "student_reduce_scatter": (dp - 1) / dp,
            "tp_allreduce": 2 * (tp - 1) / tp, "loss_exchange": tp - 1}


def flops_per_token(job: Job, layout: Layout) -> float:
    """Matmul FLOPs per token on one GPU: the student's forward and backward (6 per parameter, 2 more
    when checkpointing recomputes the forward), causal attention's scores, and the teacher's forward."""
    tp, student = layout.tensor_parallel, job.student
    checkpointing = layout.activation_checkpointing
    flops = 6 * student.matmul_params() / tp + (2 * student.matmul_params() / tp if checkpointing else 0)
    attention = 2 * job.seq_len * student.heads * student.head_dim * student.layers / tp  # causal, forward
    flops += attention * (4 if checkpointing else 3)
    if job.teacher:
        flops += 2 * job.teacher.matmul_params() / tp + 2 * job.seq_len * job.teacher.heads * job.teacher.head_dim * \
            job.teacher.layers / tp
    return flops


def step_seconds(job: Job, layout: Layout, cluster: Cluster, traffic: Dict[str, float], *,
                 device_type: str = "cuda") -> Dict[str, float]:
    """Seconds per step: ``compute``, one entry per traffic kind (``traffic`` in bytes handed in),
    ``fixed`` (:func:`fixed_seconds` on ``device_type``) and, on-policy only, ``generation``
    (:func:`generation_seconds`). A data-parallel collective that crosses nodes shares the node's
    InfiniBand among its GPUs. An on-policy step trains on P + N tokens per sequence, at most the
    data's ``seq_len``: its training parts are the off-policy step's (a bound)."""
    tp = layout.tensor_parallel
    dp = cluster.world_size // tp
    tokens = layout.micro_batch_size * job.seq_len
    result = {"compute": flops_per_token(job, layout) * tokens * layout.grad_accum / (cluster.tflops * 1e12)}
    dp_bandwidth = _dp_bandwidth(cluster)
    wire = wire_factors(tp, dp)
    for kind in TRAFFIC_KINDS:
        bandwidth = cluster.nvlink_gbps * GB if kind in TP_KINDS else dp_bandwidth
        result[kind] = traffic[kind] * wire[kind] / bandwidth
    result["fixed"] = fixed_seconds(job, layout, cluster, device_type)
    if job.generation:
        result["generation"] = generation_seconds(job, layout, cluster, device_type)
    return result


def _dp_bandwidth(cluster: Cluster) -> float:
    """Bytes/s of a data-parallel collective: the node's InfiniBand shared by its GPUs across nodes,
    NVLink within one."""
    return (cluster.ib_gbps / cluster.gpus_per_node if cluster.nodes > 1 else cluster.nvlink_gbps) * GB


@dataclass(frozen=True)
class FixedCosts:
    """Seconds per fixed event on one device type."""

    collective_s: float
    """One small collective's latency (its bytes are timed by the traffic kinds)."""
    op_s: float
    """One tensor op's launch and dispatch overhead (a kernel launch on a GPU)."""
    host_sync_s: float
    """One wait of the host for the device (none on CPU: the host is the device)."""
    hook_s: float
    """One ZeRO-3 module hook (Python: the parameter coordinator's fetch, release and trace)."""


FIXED_COSTS = {
    # ESTIMATES from published figures, not measured here (no GPU): NCCL's small-message all-reduce
    # latency within a node (nccl-tests, H100/A100 NVLink: 10-20 us), a CUDA kernel launch with
    # PyTorch's dispatch (5-10 us), a device synchronisation round trip (~20 us); a ZeRO-3 hook is
    # host Python: a third of the CPU figure below (a server core 2-3x this shared one).
    "cuda": FixedCosts(collective_s=15e-6, op_s=5e-6, host_sync_s=20e-6, hook_s=50e-6),
    # MEASURED on this 2-core CPU machine, shared with other jobs (2 processes, gloo): a 4-byte
    # all-reduce 150-210 us at best, 310-420 us median; an in-place add on 64 floats 2 us at best,
    # 3-9 us median; a ZeRO-3 hook 120-190 us: the small benchmark pair's student forward and
    # backward took 23.5 ms more CPU time per step at ZeRO-3 than at ZeRO-1 (124 hooks, TP 1, 2 ranks).
    "cpu": FixedCosts(collective_s=2e-4, op_s=5e-6, host_sync_s=0.0, hook_s=150e-6),
}

# DeepSpeed 0.19.8's stage-0 all-reduce bucket (engine.py MEMORY_OPT_ALLREDUCE_SIZE), in elements.
STAGE0_BUCKET = 5e8
# Ops per parameter tensor per stage-0 step: DeepSpeed's unflatten of the all-reduced flat buffer, a
# view and a copy back into each gradient. GuardedAdamW's norm, clip and fused update are multi-tensor
# ops (``_foreach_norm``, ``_foreach_mul_``, ``_fused_adamw_``: one call each, on CPU too; held by
# tests/test_zero_stage_auto.py).
STAGE0_OPS_PER_TENSOR = 2
# Ops per step whatever the tensor count: a flat partition's norm, clip and fused update (ZeRO 1-3),
# stage 0's flatten, all-reduce scaling and fused update.
FLAT_STEP_OPS = 10


def hooked_modules(job: Job) -> int:
    """The student's modules ZeRO-3 hooks (an estimate): one per parameter tensor (bias-free
    linears, norms, embedding, head) and the containers: each layer, its attention and MLP, and
    four at the top (model, decoder, rotary embedding, causal-LM wrapper)."""
    return len(job.student.tensors) + 3 * job.student.layers + 4


def _zero_collectives(job: Job, layout: Layout, cluster: Cluster) -> float:
    """The student's ZeRO collectives per step, as DeepSpeed 0.19.8 issues them in a steady step
    (counted on 2 gloo ranks by tests/test_zero_stage_auto.py): stage 0 one all-reduce per 5e8
    elements; 1 and 2 one reduce per ``reduce_bucket_size`` (stage 2 every micro-batch), one gather
    of the updated partitions per ``allgather_bucket_size`` and the norm's all-reduce; stage 3 every
    micro-batch a gather per module above the persistence threshold in forward and again in
    backward and a reduce-scatter per bucket, then the norm's all-reduce and, after the step, one
    gather per persistent tensor (their updated partitions: DeepSpeed gathers them one by one)."""
    stage, accum = layout.student_zero_stage, layout.grad_accum
    elements = job.student.per_rank(layout.tensor_parallel)
    if stage == 0:
        return math.ceil(elements / STAGE0_BUCKET)
    reduces = math.ceil(elements / ds_bucket(job.ds, "reduce_bucket_size", 5e8))
    if stage == 3:
        persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
        persistent = sum(1 for n, _ in job.student.tensors if n <= persistence)
        gathered = len(job.student.tensors) - persistent if cluster.world_size > 1 else 0
        return accum * (2 * gathered + reduces) + 1 + (persistent if cluster.world_size > 1 else 0)
    gathers = math.ceil(elements / ds_bucket(job.ds, "allgather_bucket_size", 5e8))
    return (accum if stage == 2 else 1) * reduces + gathers + 1


def _other_collectives(job: Job, layout: Layout, cluster: Cluster) -> float:
    """Collectives of every stage per step: the global token count; at TP > 1 AutoTP's all-reduces
    (:func:`training.plan.traffic.traffic_per_step`'s ``tp_allreduce``, by count) and the loss
    exchange per micro-batch; a ``zero3`` teacher's gathers per micro-batch."""
    count, tp, model = 1.0, layout.tensor_parallel, job.student
    if tp > 1:
        per_layer = model.row_parallel + model.column_parallel + (
            model.row_parallel - 1 if layout.activation_checkpointing else 0)
        per_micro = model.layers * per_layer + 1 + 1  # the head's input gradient, the loss exchange
        if job.teacher:
            per_micro += job.teacher.layers * job.teacher.row_parallel
        count += layout.grad_accum * per_micro
    if job.teacher and layout.teacher_placement == "zero3" and cluster.world_size > 1:
        persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
        count += layout.grad_accum * sum(1 for n, _ in job.teacher.tensors if n > persistence)
    return count


def fixed_events(job: Job, layout: Layout, cluster: Cluster) -> Dict[str, float]:
    """Per optimizer step and GPU, the events :data:`FIXED_COSTS` prices, counted from the layout:
    ``collectives`` (:func:`_zero_collectives` + :func:`_other_collectives`); ``ops`` that scale with
    the parameter tensors P (stage 0: :data:`STAGE0_OPS_PER_TENSOR` x P; stages 1-2 copy each
    gradient into a flat bucket at each reduce, stage 3 every micro-batch; then
    :data:`FLAT_STEP_OPS`); ``host_syncs`` (one per step: the step decision, GuardedAdamW's or
    ZeRO's overflow check); ``hooks``: ZeRO-3's four per hooked module per micro-batch
    (:func:`hooked_modules`). What every stage does alike per token (the models' own ops) is not
    counted: it does not change which layout wins."""
    stage, accum, tensors = layout.student_zero_stage, layout.grad_accum, len(job.student.tensors)
    if stage == 0:
        ops = STAGE0_OPS_PER_TENSOR * tensors + FLAT_STEP_OPS
    else:
        ops = (accum if stage >= 2 else 1) * tensors + FLAT_STEP_OPS
    return {"collectives": _zero_collectives(job, layout, cluster) + _other_collectives(job, layout, cluster),
            "ops": float(ops), "host_syncs": 1.0,
            "hooks": float(4 * accum * hooked_modules(job) if stage == 3 else 0)}


def fixed_seconds(job: Job, layout: Layout, cluster: Cluster, device_type: str = "cuda") -> float:
    """:func:`fixed_events` priced at :data:`FIXED_COSTS` for ``device_type`` (``cuda`` or ``cpu``)."""
    costs, events = FIXED_COSTS[device_type], fixed_events(job, layout, cluster)
    return (events["collectives"] * costs.collective_s + events["ops"] * costs.op_s +
            events["host_syncs"] * costs.host_sync_s + events["hooks"] * costs.hook_s)


# Ops (kernel launches) a one-token decode forward dispatches, views left out: ESTIMATES counted on
# transformers 5.23 (CPU, a dispatch-mode counter; tests/test_plan_on_policy.py holds them, with
# SAMPLE_OPS, to 20% of a count of training.generation's loop per token for Llama and Gemma-2 in fp32
# and bf16): per decoder layer 6 per norm (2 more
# casts below fp32), 24 for the projections, RoPE, the cache update, attention, MLP and residuals,
# 6 more for eager attention (its matmuls, scaling, mask, softmax, cast) and 3 for soft-capping its
# scores; outside the layers 24 (embedding, RoPE tables, final norm, head), 24 more under eager
# attention (its masks).
DECODE_OPS_PER_NORM = 6
DECODE_OPS_PER_LAYER = 24
DECODE_OPS_EAGER = 6
DECODE_OPS_SOFTCAP = 3
DECODE_OPS_OUTSIDE = 24
# Per generated token outside the forward: model_parallel.sample_tokens (counted: 145 non-view ops at
# temperature > 0 on one rank, its counter-based noise's integer hashing most of them; 12 greedy) and
# training.generation's bookkeeping; the test holds decode_ops + SAMPLE_OPS to a count of the job's
# own generate loop per token.
SAMPLE_OPS = 150


def decode_ops(model: ModelShape, w: int) -> int:
    """Ops one decode forward of ``model`` in ``w``-byte weights dispatches (the constants above)."""
    norm = DECODE_OPS_PER_NORM + (2 if w < 4 else 0)
    layer = (norm * model.norms + DECODE_OPS_PER_LAYER + (DECODE_OPS_EAGER if model.eager_attention else 0) +
             (DECODE_OPS_SOFTCAP if model.softcap else 0))
    return model.layers * layer + DECODE_OPS_OUTSIDE * (2 if model.eager_attention else 1)


def _tp_collectives(job: Job, layout: Layout, cluster: Cluster, tokens: int, costs: FixedCosts) -> float:
    """Seconds of one generation forward's tensor-parallel collectives over ``tokens`` rows: AutoTP's
    all-reduce after each row-parallel linear (their bytes on NVLink and a latency each) and the
    sampler's one all-gather of each rank's best (value, id) per row."""
    tp, model = layout.tensor_parallel, job.student
    if tp == 1:
        return 0.0
    count = model.layers * model.row_parallel
    moved = job.weight_bytes * tokens * model.hidden * count * wire_factors(tp, 1)["tp_allreduce"]
    return (count + 1) * costs.collective_s + moved / (cluster.nvlink_gbps * GB)


def _prefill_seconds(job: Job, layout: Layout, cluster: Cluster, costs: FixedCosts) -> float:
    """One generation call's prefill: a forward over ``B`` prompts of P tokens at the achieved
    throughput (2 FLOPs per matmul parameter and token, and causal attention's scores, as the
    training forward counts them), and its tensor-parallel collectives."""
    tp, model, prompt = layout.tensor_parallel, job.student, job.generation.prompt_tokens
    tokens = layout.micro_batch_size * prompt
    per_token = 2 * model.matmul_params() / tp + 2 * prompt * model.heads * model.head_dim * model.layers / tp
    return tokens * per_token / (cluster.tflops * 1e12) + _tp_collectives(job, layout, cluster, tokens, costs)


def _decode_token_seconds(job: Job, layout: Layout, cluster: Cluster, costs: FixedCosts) -> float:
    """One decode step (one token for ``B`` sequences): on the device the larger of its matmuls at the
    achieved throughput (2 FLOPs per matmul parameter and row) and its reads at the memory's
    bandwidth (the student's weights shard and the KV cache at its largest, a bound), then its
    tensor-parallel collectives; on the host its ops' launches (:func:`decode_ops` +
    :data:`SAMPLE_OPS`), which run ahead of the device: the step takes the longer of the two."""
    tp, model, w, batch = layout.tensor_parallel, job.student, job.weight_bytes, layout.micro_batch_size
    positions = job.generation.prompt_tokens + job.generation.new_tokens
    compute = 2 * model.matmul_params() / tp * batch / (cluster.tflops * 1e12)
    read = (w * model.matmul_params() / tp + kv_cache_bytes(model, batch, positions, tp, w)) / (cluster.hbm_gbps * GB)
    device = max(compute, read) + _tp_collectives(job, layout, cluster, batch, costs)
    return max(device, (decode_ops(model, w) + SAMPLE_OPS) * costs.op_s)


def _generation_gather_seconds(job: Job, layout: Layout, cluster: Cluster, costs: FixedCosts) -> float:
    """Under student ZeRO-3, gathering the student's shard once per generation call: the split
    tensors' partitions over the data-parallel ranks, the replicated ones' over every rank (all on
    the data-parallel link, a bound for the tensor-parallel peers on NVLink), tensors under the
    persistence threshold kept whole; one collective's latency per gathered tensor (DeepSpeed
    0.19.8's ``GatheredParameters``, under ``unwrap_model_for_generation``, issues an all-gather per
    tensor, asynchronously: their latencies partly overlap, a bound)."""
    tp, model, w = layout.tensor_parallel, job.student, job.weight_bytes
    dp, world = cluster.world_size // tp, cluster.world_size
    if layout.student_zero_stage != 3 or world == 1:
        return 0.0
    persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
    replicated = model.replicated - model.replicated_persistent(persistence)
    split = model.per_rank(tp) - model.replicated - (model.persistent(persistence) -
                                                    model.replicated_persistent(persistence))
    moved = w * split / dp * (dp - 1) + w * replicated / world * (world - 1)
    gathered = sum(1 for n, _ in model.tensors if n > persistence)
    return moved / _dp_bandwidth(cluster) + gathered * costs.collective_s


def generation_seconds(job: Job, layout: Layout, cluster: Cluster, device_type: str = "cuda") -> float:
    """Expected seconds per optimizer step spent generating (0 off-policy), an ESTIMATE: λ x (per
    micro-batch, one generation call: :func:`_prefill_seconds`, N decode steps of
    :func:`_decode_token_seconds` (N counted, one more than the N - 1 a loop that takes the first
    token from the prefill runs: a bound), and under ZeRO-3 :func:`_generation_gather_seconds`),
    priced with ``device_type``'s :data:`FIXED_COSTS`. ZeRO-3's module hooks are not counted:
    ``unwrap_model_for_generation`` lifts them for the call (re-registering them after it, once per
    call, is not counted either)."""
    if job.generation is None:
        return 0.0
    costs, new = FIXED_COSTS[device_type], job.generation.new_tokens
    call = (_prefill_seconds(job, layout, cluster, costs) + new * _decode_token_seconds(job, layout, cluster, costs) +
            _generation_gather_seconds(job, layout, cluster, costs))
    return job.generation.fraction * layout.grad_accum * call
