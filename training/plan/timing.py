"""The time model: seconds per optimizer step of compute and of each traffic kind, without overlap
(an upper bound). Compute runs at the cluster's achieved dense throughput; each kind's bytes go on
the wire with its ring algorithm's factor (:data:`WIRE_FACTORS`) over its link (:data:`TP_KINDS` on
NVLink, the rest on the data-parallel link)."""

from typing import Dict

from training.plan.inputs import GB, Cluster, Job, Layout
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


def step_seconds(job: Job, layout: Layout, cluster: Cluster, traffic: Dict[str, float]) -> Dict[str, float]:
    """Seconds per step: ``compute`` and one entry per traffic kind (``traffic`` in bytes handed in).
    A data-parallel collective that crosses nodes shares the node's InfiniBand among its GPUs."""
    tp = layout.tensor_parallel
    dp = cluster.world_size // tp
    tokens = layout.micro_batch_size * job.seq_len
    result = {"compute": flops_per_token(job, layout) * tokens * layout.grad_accum / (cluster.tflops * 1e12)}
    dp_bandwidth = (cluster.ib_gbps / cluster.gpus_per_node if cluster.nodes > 1 else cluster.nvlink_gbps) * GB
    wire = wire_factors(tp, dp)
    for kind in TRAFFIC_KINDS:
        bandwidth = cluster.nvlink_gbps * GB if kind in TP_KINDS else dp_bandwidth
        result[kind] = traffic[kind] * wire[kind] / bandwidth
    return result
