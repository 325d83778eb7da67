"""Memory per GPU by term (:data:`MEMORY_TERMS`), and the reserve CUDA and NCCL hold outside it.

A new memory term is one key in :data:`MEMORY_TERMS` and one function here that :func:`memory` calls;
``describe`` and the JSON list every key of a plan (:func:`memory_terms`).

An on-policy job (``on_policy.fraction`` > 0) has two phases per generating step: the student's
generation (:data:`GENERATION_TERMS`), then the step's forwards and backwards. Their transients are
never alive at once, so the planned peak is the terms' sum less the smaller phase's transients
(:func:`phase_overlap`): what both phases hold, plus the larger phase."""

from typing import Dict, Optional, Tuple

from loss.fused import buffer_bytes, chunk_rows
from loss.registry import divergence
from training.plan.inputs import GB, Cluster, Job, Layout
from training.plan.shape import ModelShape

# Generation's terms: the student's KV cache, its ZeRO-3 shard gathered for the call, and its
# no-grad forwards' temporaries (0, and left out of the plan, for an off-policy job).
GENERATION_TERMS = ("kv_cache", "generation_weights", "generation_forward")
MEMORY_TERMS = ("teacher_weights", "student_weights", "student_master", "student_optimizer", "student_gradients",
                "activations", "logits", "comm_buffers", *GENERATION_TERMS)
# The Gumbel-max sampler's temporaries per [B, V_local] logit of a decode step, in bytes: the most
# model_parallel.sample_tokens holds at once at temperature > 0 (counted: 50, its counter-based
# noise's int64 hash words beside the float64 uniforms and scores; held by tests/test_plan_on_policy.py).
SAMPLER_BYTES_PER_LOGIT = 50
# Outside the caching allocator on CUDA (estimates, read not measured): the context of torch 2.x with
# CUDA 12's lazy module loading takes about 0.5-1 GB on an H100 (its upper end here); NCCL gives
# each communicator, per channel and ring peer, a 4 MiB NCCL_BUFFSIZE buffer for the Simple protocol
# plus about 4.6 MiB for LL128 and 0.25 MiB for LL, over up to 16 channels on an NVLink node.
CUDA_CONTEXT_GB = 1.0
NCCL_CHANNELS = 16
NCCL_GB_PER_COMMUNICATOR = round(NCCL_CHANNELS * 2 * (4 + 4.6 + 0.25) * 2 ** 20 / GB, 2)
GRAD_BYTES = 4  # gradients accumulate in fp32 (the job sets data_types.grad_accum_dtype under bf16)


def ds_bucket(ds: Dict, key: str, default: float) -> float:
    """A ``zero_optimization`` size of the DeepSpeed JSON (its ``"auto"`` or absence: DeepSpeed's default)."""
    value = ds.get(key, default)
    return float(default if value == "auto" else value)


def layer_saved_bytes(model: ModelShape, seq: int, tp: int, w: int) -> float:
    """Bytes autograd saves for backward per decoder layer and token (sequences of ``seq`` tokens,
    weights of ``w`` bytes, the split tensors over ``tp`` ranks), by op:

    - each norm: its fp32 input (4 H), the fp32 rsqrt (4), and the normalised tensor its weight
      multiplies, fp32 for Gemma's norms (4 H), else cast back (w H); plus the two norm outputs the
      linear layers read (q/k/v's and the MLP's input, w H each), replicated over TP;
    - eager attention: q, the key and value (``repeat_kv``'d to every query head) and the output
      o_proj reads (w · heads · head_dim each); per score row of ``seq``: the fp32 softmax
      output (4), its cast to the weights' dtype (w, none in fp32) and with soft-capping the
      ``tanh`` output (w);
    - sdpa (torch's flash kernel, CPU or CUDA): q and the output (w · heads · head_dim), the key
      and value at their own heads (w · kv_heads · head_dim each; GQA without repetition), the
      fp32 log-sum-exp (4 · heads); no ``[seq, seq]`` tensor;
    - MLP: gated ``down(act(gate) * up)`` 4 w I (gate, act, up, product), else 2 w I.
    """
    hidden, inner = model.hidden, model.intermediate / tp
    heads, kv_heads, head_dim = model.heads / tp, model.kv_heads / tp, model.head_dim
    norm = 4 * hidden + 4 + (4 if model.fp32_norm_output else w) * hidden
    replicated = model.norms * norm + 2 * w * hidden
    if model.eager_attention:
        scores = 4 + (w if w != 4 else 0) + (w if model.softcap else 0)
        attention = 4 * w * heads * head_dim + heads * seq * scores
    else:
        attention = w * (2 * heads + 2 * kv_heads) * head_dim + 4 * heads
    mlp = (4 if model.gated_mlp else 2) * w * inner
    return replicated + attention + mlp


def activation_bytes(model: ModelShape, tokens: int, seq: int, tp: int, w: int, checkpointed: bool) -> float:
    """Saved activations of a student forward over ``tokens`` (``tokens / seq`` sequences): every
    layer's :func:`layer_saved_bytes`, plus the final norm and the head's input. Checkpointed
    (non-reentrant): each layer keeps only its input (w H) and one layer is recomputed at a time."""
    per_layer = tokens * layer_saved_bytes(model, seq, tp, w)
    final = tokens * (4 * model.hidden + 4 + (4 if model.fp32_norm_output else w) * model.hidden + w * model.hidden)
    if checkpointed:
        return w * tokens * model.layers * model.hidden + per_layer + final
    return model.layers * per_layer + final


def teacher_forward_bytes(model: ModelShape, tokens: int, seq: int, tp: int, w: int) -> float:
    """The peak of a no-grad forward above its input, before the head: one layer's temporaries at
    a time, the larger of two moments, plus what the whole forward keeps (RoPE's cos and sin, and
    eager attention's ``[seq, seq]`` masks, one per kind of layer, per sequence):

    - at eager attention's softmax: the layer's input and normed input (2 w H), q, k, v after
      RoPE (and k, v repeated to every head under GQA), and per score row the scores with their
      mask (w), their fp32 copy (4, none in fp32) and the fp32 softmax (4); under sdpa q, k, v and
      the output;
    - at the MLP's product: input, residual and normed (3 w H), and act, up and their product (3 w I;
      2 w I ungated).
    """
    hidden, inner = model.hidden, model.intermediate / tp
    heads, kv_heads, head_dim = model.heads / tp, model.kv_heads / tp, model.head_dim
    if model.eager_attention:
        repeated = 2 * w * heads * head_dim if kv_heads < heads else 0
        attention = (2 * w * hidden + w * (heads + 2 * kv_heads) * head_dim + repeated +
                     heads * seq * (w + 4 + (4 if w != 4 else 0)))
        kept = model.mask_kinds * w * seq
    else:
        attention = 2 * w * hidden + 2 * w * (heads + kv_heads) * head_dim
        kept = 0
    mlp = 3 * w * hidden + (3 if model.gated_mlp else 2) * w * inner
    return tokens * (max(attention, mlp) + kept + 2 * w * head_dim)


def logits_bytes(model: ModelShape, tokens: int, vocab_local: int, w: int, *, device_type: str = "cuda",
                 loss_kind: str = "tail") -> float:
    """The peak of the unfused logits path (heads, loss, backward to the student's last hidden state)
    in units of L, one ``[tokens, V_local]`` tensor of ``w`` bytes: the student's logits and the
    teacher's (donated to the student's gradient) 2 L, with the loss's fp32 row-chunk buffers
    (``loss.registry``'s ``buffer_bytes`` for ``loss_kind``); with a final soft-capping (Gemma-2)
    the student's saved ``tanh`` output (1 L) and, in its backward, the gradient through the
    scaling and through ``tanh`` (2 L), which outgrow the loss's buffers."""
    logits = tokens * vocab_local * w
    buffers = divergence(loss_kind).buffer_bytes(tokens, vocab_local, w, device_type)
    if model.final_softcap:
        return 3 * logits + max(buffers, 2 * logits)
    return 2 * logits + buffers


# Per token, the fused path's detached per-token outputs (about a dozen fp32 and int64 ``[tokens]``
# tensors, held per chunk and then concatenated) and its exchange payloads: small beside the rest.
FUSED_PER_TOKEN_BYTES = 256


def _fused_chunk_moments(tokens: int, vocab_local: int, hidden: int, w: int, *, softcap: bool, teacher: bool,
                         device_type: str) -> float:
    """Bytes of the fused forward's moments that :func:`loss.fused.buffer_bytes` does not bound (its
    fp32 accumulators ``4 (V_local + tokens) H`` excluded), the largest of, with ``C`` one chunk's
    logits and ``t`` 1 with a teacher:

    - with a soft-cap, at the next chunk's heads: the last teacher ``tanh`` output still held, and
      each head's matmul, ``tanh`` and logits (3 (1 + t) w C);
    - with a soft-cap, at its derivative: the chunk's gradient (in the teacher's donated logits),
      the ``tanh`` outputs and, below fp32, fp32 copies of the gradient and the ``tanh`` and
      ``1 - tanh²`` ((2 + t) w C + 12 C; in fp32 the copies are the tensors themselves, (3 + t) w C);
    - below fp32, at the weight-gradient accumulation: the chunk's gradient (and the held teacher
      ``tanh``) beside the chunk's ``[V_local, H]`` product in the weights' dtype and its fp32 copy,
      except on CUDA, where ``loss.fused`` accumulates through an fp32-output GEMM in place (torch >=
      2.8's ``addmm(out_dtype=float32)``; assumed present, as it is from sm80 on: an ESTIMATE).
    """
    chunk, held = chunk_rows(tokens, vocab_local, device_type) * vocab_local, int(softcap and teacher)
    moments = [0.0]
    if softcap:
        moments += [3 * (1 + int(teacher)) * w * chunk, (2 + held) * w * chunk + 12 * chunk if w != 4 else
                    (3 + held) * w * chunk]
    if w != 4:
        product = 0 if device_type == "cuda" else (w + 4) * vocab_local * hidden
        moments.append((1 + held) * w * chunk + product)
    return max(moments)


def fused_logits_bytes(student: ModelShape, teacher: Optional[ModelShape], tokens: int, vocab_local: int, w: int, *,
                       device_type: str = "cuda", loss_kind: str = "tail", teacher_head_gathered: bool = False) -> float:
    """The peak of the fused logits path (``loss.fused``: both output layers applied inside the loss,
    a chunk of rows at a time; nothing ``[tokens, V_local]``), the largest of its moments:

    - forward: :func:`loss.fused.buffer_bytes` (one chunk's logits of both heads and the student's
      gradient, the soft-cap's ``tanh``, the kind's temporaries on the chunk, the fp32 head-weight
      gradient ``[V_local, H]`` and hidden-state gradient ``[tokens, H]``), or where larger the
      accumulators and the moments of :func:`_fused_chunk_moments`; plus the teacher's final hidden
      rows ``[tokens, H_t]`` (kept instead of its logits), for a ``zero3`` teacher
      (``teacher_head_gathered``) its head's slice ``[V_local, H_t]`` gathered for the call, and
      :data:`FUSED_PER_TOKEN_BYTES` per token;
    - backward, below fp32: the fp32 gradients cast to the weights' dtype for autograd, the hidden
      state's first (``w·tokens·H`` beside both fp32 ones), then the weight's (``w·V_local·H``
      beside the fp32 weight gradient and the cast hidden one).
    """
    hidden, softcap = student.hidden, student.final_softcap
    accumulators = 4 * (vocab_local + tokens) * hidden
    forward = max(buffer_bytes(tokens, vocab_local, hidden, w, device_type, kind=loss_kind, softcap=softcap),
                  accumulators + _fused_chunk_moments(tokens, vocab_local, hidden, w, softcap=softcap,
                                                       teacher=teacher is not None, device_type=device_type))
    forward += FUSED_PER_TOKEN_BYTES * tokens
    if teacher is not None:
        forward += w * tokens * teacher.hidden + (w * vocab_local * teacher.hidden if teacher_head_gathered else 0)
    backward = 0.0
    if w != 4:
        backward = 4 * vocab_local * hidden + w * tokens * hidden + max(4 * tokens * hidden, w * vocab_local * hidden)
    return max(forward, backward)


def _logits(job: Job, layout: Layout, tokens: int, dp: int, device_type: str) -> float:
    """The logits term of the path the job takes (:attr:`Job.fused_head`)."""
    vocab_local, w = job.student.vocab // layout.tensor_parallel, job.weight_bytes
    if job.fused_head:
        gathered = job.teacher is not None and layout.teacher_placement == "zero3" and dp > 1
        return fused_logits_bytes(job.student, job.teacher, tokens, vocab_local, w, device_type=device_type,
                                  loss_kind=job.loss_kind, teacher_head_gathered=gathered)
    return logits_bytes(job.student, tokens, vocab_local, w, device_type=device_type, loss_kind=job.loss_kind)


def runtime_reserve(tp: int, dp: int) -> float:
    """Bytes per GPU that CUDA and NCCL hold outside the caching allocator (estimates, see
    ``ASSUMPTIONS``): the context, and NCCL's buffers for each communicator a rank is in (the
    world; the tensor-parallel group and its data-parallel group where both have peers)."""
    communicators = 1 + (tp > 1) + (tp > 1 and dp > 1)
    return (CUDA_CONTEXT_GB + communicators * NCCL_GB_PER_COMMUNICATOR) * GB


def student_partition(job: Job, layout: Layout, cluster: Cluster) -> float:
    """Parameters of the student whose fp32 states (master, moments) one rank holds. Stage 0 keeps
    them whole on every rank; stages 1 and 2 partition them over the data-parallel ranks; stage 3
    partitions the TP-split tensors over those and the TP-replicated ones (embedding, norms) over
    every rank, and keeps tensors under the persistence threshold whole."""
    tp, stage = layout.tensor_parallel, layout.student_zero_stage
    dp = cluster.world_size // tp
    student = job.student.per_rank(tp)
    if stage == 3:
        replicated = job.student.replicated
        return (student - replicated) / dp + replicated / cluster.world_size
    return student / dp if stage else student


def _student_states(job: Job, layout: Layout, states: float, device_type: str) -> Dict[str, float]:
    """The student's weights, fp32 master copy, Adam moments and gradients on one rank."""
    stage, w = layout.student_zero_stage, job.weight_bytes
    student = job.student.per_rank(layout.tensor_parallel)
    persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
    return {
        "student_weights": w * (states + job.student.persistent(persistence) if stage == 3 else student),
        # Stage 0 is fp32 only (training.deepspeed_config.stage_problem): the weights are the master copy.
        "student_master": 4 * states if stage else 0.0,
        # Adam's two moments (fp32); on CPU torch's AdamW also makes one partition-sized temporary per step.
        "student_optimizer": (8 + (4 if device_type == "cpu" else 0)) * states,
        # Stages 0 and 1 hold every gradient until the step; stages 2 and 3 their partition (plus a bucket).
        "student_gradients": GRAD_BYTES * (student if stage <= 1 else states),
    }


def _gathered_parameters(job: Job, layout: Layout, cluster: Cluster, states: float) -> Tuple[float, float]:
    """``(student, teacher)``: bytes of the parameters ZeRO-3 gathers for the step's forwards and
    backwards beyond each rank's partition, which stay live up to stage3_max_live_parameters (the
    whole model, for models below 1e9 parameters); 0 for a model not partitioned."""
    tp, w = layout.tensor_parallel, job.weight_bytes
    dp = cluster.world_size // tp
    student, teacher = job.student.per_rank(tp), job.teacher.per_rank(tp) if job.teacher else 0
    live = ds_bucket(job.ds, "stage3_max_live_parameters", 1e9)
    gathered_student = w * (min(live, student) - states) if layout.student_zero_stage == 3 else 0.0
    gathered_teacher = 0.0
    if teacher and layout.teacher_placement == "zero3" and dp > 1:
        gathered_teacher = w * (min(live, teacher) - teacher / dp)
    return gathered_student, gathered_teacher


def _comm_buffers(job: Job, layout: Layout, cluster: Cluster, states: float) -> float:
    """The gradient bucket (its touched part), and under ZeRO-3 the gathered parameters
    (:func:`_gathered_parameters`)."""
    gathered_student, gathered_teacher = _gathered_parameters(job, layout, cluster, states)
    student = job.student.per_rank(layout.tensor_parallel)
    buffers = GRAD_BYTES * min(ds_bucket(job.ds, "reduce_bucket_size", 5e8), student)
    buffers += gathered_student
    buffers += gathered_teacher
    return max(buffers, 0.0)


def kv_cache_bytes(model: ModelShape, batch: int, positions: int, tp: int, w: int) -> float:
    """Bytes per GPU of one generation call's KV cache at its largest, ``positions`` (P + N) cached
    for ``batch`` sequences: per decoder layer a key and a value ``[batch, kv_heads / tp, kept,
    head_dim]`` of ``w`` bytes (AutoTP splits k_proj and v_proj by heads, so a rank caches its
    kv_heads / tp), ``kept`` = ``positions`` for a full layer and ``min(positions, window - 1)`` for
    a sliding one (transformers' ``DynamicSlidingWindowLayer`` keeps the last window - 1 positions;
    :attr:`ModelShape.cache_windows`)."""
    windows = model.cache_windows or (None,) * model.layers
    kept = sum(positions if window is None else min(positions, window - 1) for window in windows)
    return 2 * batch * (model.kv_heads / tp) * model.head_dim * w * kept


def generation_forward_bytes(model: ModelShape, batch: int, prompt: int, new: int, vocab_local: int, tp: int,
                             w: int) -> float:
    """The peak of generation's no-grad forwards above the KV cache and the weights, the largest of:

    - the prefill's decoder layers over ``batch`` prompts of ``prompt`` tokens, one layer's
      temporaries at a time (:func:`teacher_forward_bytes`, as the teacher's no-grad forward);
    - the prefill's head: the last position's logits ``[batch, V_local]`` where the model takes
      ``logits_to_keep`` (``training.generation`` asks for one; :attr:`ModelShape.keeps_logits`),
      else every prompt position's ``[batch, prompt, V_local]``, twice with a final soft-cap (each
      of its ops makes a new tensor beside its input), and the sampler's temporaries on
      ``[batch, V_local]`` (:data:`SAMPLER_BYTES_PER_LOGIT`);
    - a decode step at its last token: one layer's key and value repeated to every query head
      (GQA's ``repeat_kv``, over ``prompt + new`` positions), and the head's and sampler's
      ``[batch, V_local]`` temporaries.
    """
    heads, positions = model.heads / tp, prompt + new
    softcapped = 2 if model.final_softcap else 1
    layers = teacher_forward_bytes(model, batch * prompt, prompt, tp, w)
    sampler = batch * vocab_local * SAMPLER_BYTES_PER_LOGIT
    head = batch * (1 if model.keeps_logits else prompt) * vocab_local * w * softcapped + sampler
    decode = 2 * batch * heads * positions * model.head_dim * w + batch * vocab_local * w * softcapped + sampler
    return max(layers, head, decode)


def _generation_terms(job: Job, layout: Layout, states: float) -> Dict[str, float]:
    """:data:`GENERATION_TERMS` of an on-policy job: one micro-batch's generation call at a time (the
    cache is released before the next); ``generation_weights`` under student ZeRO-3 the rest of the
    student's tensor-parallel shard, gathered once per call and kept for it (with ``student_weights``
    the whole shard, ``w x per_rank``); 0 at stages 0-2, which hold the shard whole."""
    tp, w, batch, generation = layout.tensor_parallel, job.weight_bytes, layout.micro_batch_size, job.generation
    prompt, new = generation.prompt_tokens, generation.new_tokens
    gathered = 0.0
    if layout.student_zero_stage == 3:
        persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
        gathered = w * max(job.student.per_rank(tp) - states - job.student.persistent(persistence), 0.0)
    return {"kv_cache": kv_cache_bytes(job.student, batch, prompt + new, tp, w), "generation_weights": gathered,
            "generation_forward": generation_forward_bytes(job.student, batch, prompt, new, job.student.vocab // tp,
                                                           tp, w)}


def memory_terms(job: Job) -> Tuple[str, ...]:
    """The terms of ``job``'s plan: :data:`MEMORY_TERMS`, less :data:`GENERATION_TERMS` for an off-policy
    job (whose plan is the same as without the ``on_policy`` section, key for key)."""
    return MEMORY_TERMS if job.generation else tuple(t for t in MEMORY_TERMS if t not in GENERATION_TERMS)


def phase_overlap(job: Job, layout: Layout, cluster: Cluster, memory: Dict[str, float]) -> float:
    """Bytes ``memory``'s terms count twice though they are never alive at once (0 off-policy):
    generation runs before the step's forwards and releases its cache, forward temporaries and
    gathered shard first, so :data:`GENERATION_TERMS` and the training phase's transients
    (activations, logits, and the parameters ZeRO-3 gathers for the forwards and backwards, part of
    ``comm_buffers``) take turns in the same room. The planned peak is the terms' sum less this: what
    both phases hold, plus the larger phase's transients."""
    if job.generation is None:
        return 0.0
    gathered = sum(_gathered_parameters(job, layout, cluster, student_partition(job, layout, cluster)))
    training = memory["activations"] + memory["logits"] + min(max(gathered, 0.0), memory["comm_buffers"])
    return min(training, sum(memory[term] for term in GENERATION_TERMS))


def memory_per_gpu(job: Job, layout: Layout, cluster: Cluster, *, device_type: str = "cuda") -> Dict[str, float]:
    """Bytes per GPU of ``layout`` for ``job`` on ``cluster``, by :func:`memory_terms` (the planned peak
    is their sum, every term counted as alive at once, less :func:`phase_overlap` on-policy). An
    on-policy step trains on P + N tokens per sequence, at most the data's ``seq_len``: its training
    terms are the off-policy step's (a bound)."""
    tp, w = layout.tensor_parallel, job.weight_bytes
    dp = cluster.world_size // tp
    tokens = layout.micro_batch_size * job.seq_len
    states = student_partition(job, layout, cluster)
    result = dict.fromkeys(memory_terms(job), 0.0)
    result.update(_student_states(job, layout, states, device_type))
    if job.teacher:
        teacher = job.teacher.per_rank(tp)
        persistence = ds_bucket(job.ds, "stage3_param_persistence_threshold", 1e5)
        resident = layout.teacher_placement == "resident" or dp == 1
        result["teacher_weights"] = w * (teacher if resident else teacher / dp + job.teacher.persistent(persistence))
    result["activations"] = activation_bytes(job.student, tokens, job.seq_len, tp, w, layout.activation_checkpointing)
    if job.teacher:
        result["activations"] += teacher_forward_bytes(job.teacher, tokens, job.seq_len, tp, w)
    result["logits"] = _logits(job, layout, tokens, dp, device_type)
    result["comm_buffers"] = _comm_buffers(job, layout, cluster, states)
    if job.generation:
        result.update(_generation_terms(job, layout, states))
    return result
