"""Bytes each GPU hands into collectives per optimizer step, by kind (:data:`TRAFFIC_KINDS`): what
``model_parallel.testing.comm_counter`` counts. :mod:`training.plan.timing` puts them on the wire.

A new kind is one key in :data:`TRAFFIC_KINDS`, its bytes here, and its wire factor and link in
:mod:`training.plan.timing`."""

from typing import Dict

from loss.registry import divergence
from training.plan.inputs import Cluster, Job, Layout
from training.plan.memory import GRAD_BYTES, ds_bucket

TRAFFIC_KINDS = ("teacher_gather", "student_gather", "student_reduce_scatter", "tp_allreduce", "loss_exchange")
# Float64 numbers the vocabulary-layout check exchanges per loss call.
_LAYOUT_CHECK_BYTES = 40


def _student_gather(job: Job, layout: Layout, cluster: Cluster) -> float:
    """ZeRO's parameter gathers of the student (bf16/fp32 weights)."""
    tp, stage, accum, w = layout.tensor_parallel, layout.student_zero_stage, layout.grad_accum, job.weight_bytes
    dp = cluster.world_size // tp
    student = job.student.per_rank(tp)
    persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
    gathered = 0.0
    if stage == 3 and cluster.world_size > 1:
        # The TP-replicated tensors are partitioned over every rank: gathered over all of them.
        rest = job.student.replicated - job.student.replicated_persistent(persistence)
        gathered += accum * w * rest / cluster.world_size
    if dp > 1:
        if stage == 3:
            # Parameters gathered in forward stay gathered through backward unless the model is
            # larger than stage3_max_live_parameters / max_reuse_distance (then gathered again).
            gathers = accum * (1 if student <= ds_bucket(job.ds, "stage3_max_live_parameters", 1e9) else 2)
            split = student - job.student.replicated
            gathered += gathers * w * (split - (job.student.persistent(persistence) -
                                                job.student.replicated_persistent(persistence))) / dp
        elif stage:
            gathered = w * student / dp  # the updated partitions, once per step
    return gathered


def _teacher_gather(job: Job, layout: Layout, cluster: Cluster) -> float:
    """A ``zero3`` teacher's parameter gathers, every micro-batch (a frozen model keeps nothing gathered)."""
    dp = cluster.world_size // layout.tensor_parallel
    if not job.teacher or dp <= 1 or layout.teacher_placement != "zero3":
        return 0.0
    persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
    teacher = job.teacher.per_rank(layout.tensor_parallel)
    return layout.grad_accum * job.weight_bytes * (teacher - job.teacher.persistent(persistence)) / dp


def _tp_allreduce(job: Job, layout: Layout) -> float:
    """AutoTP's all-reduces per step. Forward: one per row-parallel linear; backward: one per
    column-parallel linear and one for the vocabulary-parallel head's input (at the positions with
    a target; the fused head's is fp32: ``loss.fused`` sums its hidden-state gradient in fp32);
    checkpointed recomputation repeats the forward's but the last (autograd's early stop: nothing
    after it is saved). The teacher's no-grad forward: its row-parallel linears."""
    model, w, micro = job.student, job.weight_bytes, layout.micro_batch_size
    tokens = micro * job.seq_len
    per_layer = model.row_parallel + model.column_parallel + (
        model.row_parallel - 1 if layout.activation_checkpointing else 0)
    head = (4 if job.fused_head else w) * model.hidden * micro * (job.seq_len - 1)
    per_micro = w * model.hidden * tokens * model.layers * per_layer + head
    if job.teacher:
        per_micro += w * tokens * job.teacher.layers * job.teacher.row_parallel * job.teacher.hidden
    return layout.grad_accum * per_micro


def _loss_exchange(job: Job, layout: Layout) -> float:
    """Per position with a target, the loss kind's fp32 numbers (``loss.registry``'s
    ``exchange_numbers``: its statistics and both models' argmax), plus the layout check per call."""
    numbers = divergence(job.loss_kind).exchange_numbers(job.top_k, job.student.vocab)
    positions = layout.micro_batch_size * (job.seq_len - 1)
    return layout.grad_accum * (positions * 4 * numbers + _LAYOUT_CHECK_BYTES)


def traffic_per_step(job: Job, layout: Layout, cluster: Cluster) -> Dict[str, float]:
    """Bytes per optimizer step each GPU hands into collectives, by :data:`TRAFFIC_KINDS`."""
    tp, stage = layout.tensor_parallel, layout.student_zero_stage
    result = dict.fromkeys(TRAFFIC_KINDS, 0.0)
    # DeepSpeed reduces gradients (fp32) even over one data-parallel rank: stages 0 and 1 once per
    # step (an all-reduce), stage 2 every micro-batch (an all-reduce), stage 3 every micro-batch (a
    # reduce-scatter).
    result["student_reduce_scatter"] = (1 if stage <= 1 else layout.grad_accum) * GRAD_BYTES * job.student.per_rank(tp)
    result["student_gather"] = _student_gather(job, layout, cluster)
    result["teacher_gather"] = _teacher_gather(job, layout, cluster)
    if tp > 1:
        if job.teacher:
            result["loss_exchange"] = _loss_exchange(job, layout)
        result["tp_allreduce"] = _tp_allreduce(job, layout)
    return result
