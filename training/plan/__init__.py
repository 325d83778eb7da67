"""Plan a distillation job's layout before it runs: memory per GPU by term, collective bytes per
step by kind, and a step-time estimate, for every layout of the two models on a cluster.

Every figure is an **estimate** from the models' shapes (built on the ``meta`` device from their
configs: no weights, no hub) and the cluster's nominal figures; :data:`ASSUMPTIONS` lists what the
model of the job assumes. ``launch.plan`` prints it; the job prints the plan of its own layout at
start and logs ``planned_peak_memory_gb`` beside its measured ``peak_memory_gb``.

Units: bytes; GB = 10⁹ bytes. Traffic is the bytes each GPU hands *into* collectives per optimizer
step (what ``model_parallel.comm_counter`` counts); the time model turns them into bytes on the
wire with the ring algorithms' factors.
"""

import functools
import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

from core.errors import ConfigError
from loss.registry import divergence
from loss.tail import CHUNK_NUMEL, CPU_CHUNK_NUMEL
from training.deepspeed_config import read_deepspeed_json, resolve_student_stage, stage_problem

GB = 1e9
MEMORY_TERMS = ("teacher_weights", "student_weights", "student_master", "student_optimizer", "student_gradients",
                "activations", "logits", "comm_buffers")
TRAFFIC_KINDS = ("teacher_gather", "student_gather", "student_reduce_scatter", "tp_allreduce", "loss_exchange")
# Outside the caching allocator on CUDA (estimates, read not measured): the context of torch 2.x with
# CUDA 12's lazy module loading takes about 0.5-1 GB on an H100 (its upper end here); NCCL gives
# each communicator, per channel and ring peer, a 4 MiB NCCL_BUFFSIZE buffer for the Simple protocol
# plus about 4.6 MiB for LL128 and 0.25 MiB for LL, over up to 16 channels on an NVLink node.
CUDA_CONTEXT_GB = 1.0
# A layout fits when its planned peak and that reserve leave this share of the GPU free: room for
# the caching allocator's fragmentation and for what the plan does not count.
HEADROOM = 0.10
NCCL_CHANNELS = 16
NCCL_GB_PER_COMMUNICATOR = round(NCCL_CHANNELS * 2 * (4 + 4.6 + 0.25) * 2 ** 20 / GB, 2)
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch", "configs",
                          "models")

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


@dataclass(frozen=True)
class Cluster:
    """The cluster a plan is for: ``gpu_memory_gb`` usable per GPU, ``tflops`` achieved dense bf16
    per GPU, ``nvlink_gbps`` GB/s per GPU and ``ib_gbps`` GB/s per node, each direction."""

    nodes: int = 2
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    tflops: float = 400.0
    nvlink_gbps: float = 450.0
    ib_gbps: float = 200.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model, counted on the meta device (after vocabulary alignment)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sharded: int
    """Parameters AutoTP splits over the tensor-parallel ranks (decoder linears; the head separately)."""
    replicated: int
    """Parameters every tensor-parallel rank holds whole (embedding, norms, biases of split layers)."""
    head: int
    """Parameters of a separate LM head (0 when tied and kept tied)."""
    largest_layer: int
    """Parameters of the largest decoder layer (ZeRO-3 gathers one at a time, at least)."""
    attention: str
    """The attention implementation transformers resolves for the model (``eager`` materialises
    ``[heads, seq, seq]`` scores; ``sdpa`` and the flash kernels do not). Gemma-2 has no sdpa
    (transformers refuses it: soft-capping), so it resolves to eager."""
    row_parallel: int
    """Linear layers per decoder layer whose output AutoTP all-reduces in forward (o_proj, down_proj)."""
    column_parallel: int
    """The other linear layers per decoder layer, whose input gradient AutoTP all-reduces in backward."""
    tensors: tuple
    """``(elements, split by AutoTP)`` of every parameter tensor on one TP rank (ZeRO-3 keeps those
    at or below its persistence threshold whole on every rank and never gathers them)."""
    norms: int = 2
    """RMS/layer norms per decoder layer (Llama 2, Gemma-2 4)."""
    fp32_norm_output: bool = False
    """The norm scales its fp32 normalised input by its weight in fp32 and saves that fp32 tensor
    (Gemma's ``x * (1 + w.float())``); otherwise it casts back first and saves the cast (Llama)."""
    softcap: bool = False
    """Eager attention soft-caps its scores (``tanh``, which saves its ``[heads, seq, seq]`` output)."""
    final_softcap: bool = False
    """The head's logits are soft-capped (``tanh`` over ``[tokens, vocab]``)."""
    gated_mlp: bool = True
    """The MLP is ``down(act(gate(x)) * up(x))`` (saves 4 intermediate-sized tensors) rather than
    ``fc2(act(fc1(x)))`` (2)."""
    mask_kinds: int = 1
    """Distinct ``[seq, seq]`` masks an eager forward builds (2 with sliding-window layers)."""

    @property
    def eager_attention(self) -> bool:
        return self.attention == "eager"

    def persistent(self, threshold: float) -> int:
        return sum(n for n, _ in self.tensors if n <= threshold)

    def replicated_persistent(self, threshold: float) -> int:
        return sum(n for n, split in self.tensors if n <= threshold and not split)

    def per_rank(self, tp: int) -> int:
        """Parameters on one tensor-parallel rank."""
        return (self.sharded + self.head) // tp + self.replicated

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (everything but the embedding lookup)."""
        return self.sharded + (self.head or self.vocab * self.hidden)


@dataclass(frozen=True)
class Layout:
    """One way to run the job: the dotted config keys :meth:`as_config` names."""

    tensor_parallel: int
    teacher_placement: str
    student_zero_stage: int
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: bool

    def as_config(self) -> Dict[str, object]:
        return {"parallel.tensor_parallel": self.tensor_parallel,
                "parallel.teacher_placement": self.teacher_placement,
                "parallel.student_zero_stage": self.student_zero_stage,
                "train.micro_batch_size": self.micro_batch_size, "train.grad_accum": self.grad_accum,
                "train.activation_checkpointing": self.activation_checkpointing}

    def set_arguments(self) -> str:
        return " ".join(f"--set {key}={str(value).lower() if isinstance(value, bool) else value}"
                        for key, value in self.as_config().items())


def _one_digit(value: float) -> int:
    """``value`` rounded down to one significant digit (4.6e7 -> 4e7)."""
    scale = 10 ** int(math.floor(math.log10(value)))
    return int(value // scale * scale)


def deepspeed_settings(job: "Job", layout: Layout) -> Dict[str, object]:
    """The DeepSpeed JSON values the plan chooses for ``layout`` (dotted keys), as estimates:

    - ``reduce_bucket_size`` (and ZeRO-3's ``stage3_prefetch_bucket_size``): the student's
      parameters per rank over 8, so that a step's gradient reduction and parameter gathers come in
      at least 8 pieces that can overlap with compute, between 5e6 elements (below which a
      collective's latency dominates) and DeepSpeed's 5e8; one significant digit;
    - ``stage3_param_persistence_threshold``: DeepSpeed's 1e5 (tensors below it cost more to gather
      than to keep);
    - ``data_types.grad_accum_dtype``: fp32 under bf16 (the job sets it; 8 mantissa bits lose
      micro-batch contributions otherwise).
    """
    student = job.student.per_rank(layout.tensor_parallel)
    bucket = _one_digit(min(5e8, max(5e6, student / 8)))
    settings = {"zero_optimization.reduce_bucket_size": bucket}
    if layout.student_zero_stage == 3 or layout.teacher_placement == "zero3":
        settings["zero_optimization.stage3_prefetch_bucket_size"] = bucket
        settings["zero_optimization.stage3_param_persistence_threshold"] = 100000
    if job.weight_bytes == 2:
        settings["data_types.grad_accum_dtype"] = "fp32"
    return settings


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

    @property
    def peak_memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def step_time_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def bottleneck(self) -> str:
        return max(self.seconds, key=self.seconds.get)

    @property
    def fits(self) -> bool:
        return self.rejected is None


@dataclass(frozen=True)
class Job:
    """The parts of a run config the plan reads."""

    teacher: Optional[ModelShape]
    student: ModelShape
    seq_len: int
    global_batch: int
    """Sequences per optimizer step (micro-batch × grad_accum × data-parallel ranks)."""
    weight_bytes: int
    """2 under bf16, 4 in fp32."""
    top_k: int
    loss_kind: str
    ds: Dict = field(default_factory=dict)
    """The DeepSpeed JSON's ``zero_optimization`` section (bucket sizes, persistence)."""


# ---------------------------------------------------------------------------------------------
# Model shapes, offline


# The names AutoTP treats as row-parallel (its LinearAllreduce: output all-reduced in forward).
_ROW_PARALLEL = {"o_proj", "down_proj", "out_proj", "dense", "dense_4h_to_h", "fc2", "w2", "wo", "c_proj"}


def _architecture_source(section, key: str) -> str:
    """A local config for ``section``: its ``config`` file, its local ``path``, or a shipped
    architecture in launch/configs/models whose ``_name_or_path`` is the hub id in ``path``."""
    source = getattr(section, "config", None) or section.path
    if source is None:
        raise ConfigError(f"{key}.path: required to plan")
    if os.path.exists(source):
        return source
    for candidate in sorted(glob.glob(os.path.join(MODELS_DIR, "*.json"))):
        with open(candidate) as handle:
            if json.load(handle).get("_name_or_path") == source:
                return candidate
    raise ConfigError(f"{key}.path: {source!r} is not a local directory and no architecture in "
                      f"{os.path.relpath(MODELS_DIR)} has _name_or_path {source!r}; add its config.json there")


@functools.lru_cache(maxsize=None)
def model_shape(source: str, *, vocab: int, tp: int, attn_implementation: str = "auto") -> ModelShape:
    """Count ``source``'s parameters on the meta device, with ``vocab`` embedding rows (cached: a
    plan compares every layout, and a plan that fits nowhere plans again for bigger clusters)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.vocab_size = vocab
    text = config.get_text_config()
    with torch.device("meta"):
        # The implementation the job gets: "auto" leaves the choice to transformers, as training.engines does.
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=None if attn_implementation == "auto" else attn_implementation)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    # Tied with a scaled embedding (Gemma-2): the job unties it at tensor_parallel > 1.
    untied_at_load = tied and tp > 1 and type(embedding) is not torch.nn.Embedding
    head_params = embedding.weight.numel() if untied_at_load else (0 if tied or head is None else head.weight.numel())
    sharded = replicated = largest = 0
    tensors = [(embedding.weight.numel(), False)]
    if head_params:
        tensors.append((head_params // tp, True))
    seen = {id(embedding.weight)} | ({id(head.weight)} if head is not None else set())
    layers = [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
    for layer in layers:
        largest = max(largest, sum(p.numel() for p in layer.parameters()))
    linears = [name.rsplit(".", 1)[-1] for name, module in layers[0].named_modules() if isinstance(module, torch.nn.Linear)]
    row = sum(name in _ROW_PARALLEL for name in linears)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            split = isinstance(module, torch.nn.Linear) and name == "weight"
            if split:
                sharded += parameter.numel()
            else:
                replicated += parameter.numel()
            tensors.append((parameter.numel() // tp if split else parameter.numel(), split))
    replicated += embedding.weight.numel()
    attention = model.config.get_text_config()._attn_implementation or "eager"
    norms = [module for module in layers[0].modules() if "norm" in type(module).__name__.lower()]
    mlp_linears = [name for name in linears if name in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2",
                                                         "w1", "w2", "w3", "c_fc", "c_proj")]
    heads = text.num_attention_heads
    layer_types = getattr(text, "layer_types", None) or []
    return ModelShape(layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                      heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=vocab,
                      sharded=sharded, replicated=replicated, head=head_params, largest_layer=largest,
                      attention="eager" if attention == "eager" else attention, row_parallel=row,
                      column_parallel=len(linears) - row, tensors=tuple(tensors), norms=len(norms),
                      # Gemma's norms (Gemma-2's included) multiply by (1 + weight) in fp32.
                      fp32_norm_output=any(type(norm).__name__.startswith("Gemma") for norm in norms),
                      softcap=getattr(text, "attn_logit_softcapping", None) is not None,
                      final_softcap=getattr(text, "final_logit_softcapping", None) is not None,
                      gated_mlp="gate_proj" in linears or len(mlp_linears) >= 3,
                      mask_kinds=max(len(set(layer_types)), 1))


@functools.lru_cache(maxsize=None)
def _vocab_rows(source: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).get_text_config().vocab_size


def _seq_len(cfg) -> int:
    """The prepared training data's sequence length (its manifest) where it exists, else ``data.seq_len``."""
    manifest = os.path.join(cfg.data.train or "", "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as handle:
            return int(json.load(handle).get("seq_len", cfg.data.seq_len))
    return cfg.data.seq_len


def job_from_config(cfg, *, world_size: int, tp: Optional[int] = None, bf16: Optional[bool] = None) -> Job:
    """The plan's view of ``cfg`` (a :class:`training.config.RunConfig`) on ``world_size`` GPUs,
    its models counted for tensor-parallel size ``tp`` (default: the config's); ``bf16`` where the
    caller knows it (default: ``train.dtype`` bf16 or auto)."""
    tp = tp or cfg.parallel.tensor_parallel
    needs_teacher = divergence(cfg.loss.kind).needs_teacher
    sources = {"student": _architecture_source(cfg.student, "student")}
    if needs_teacher:
        sources["teacher"] = _architecture_source(cfg.teacher, "teacher")
    rows = max(_vocab_rows(source) for source in sources.values())
    vocab = -(-rows // tp) * tp  # both heads share one size, a multiple of tp (training.engines)
    shapes = {name: model_shape(source, vocab=vocab, tp=tp, attn_implementation=getattr(cfg, name).attn_implementation)
              for name, source in sources.items()}
    config_dp = world_size // cfg.parallel.tensor_parallel
    bf16 = cfg.train.dtype in ("bf16", "auto") if bf16 is None else bf16
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config).get("zero_optimization", {})
    return Job(teacher=shapes.get("teacher"), student=shapes["student"], seq_len=_seq_len(cfg),
               global_batch=cfg.train.micro_batch_size * cfg.train.grad_accum * max(config_dp, 1),
               weight_bytes=2 if bf16 else 4, top_k=cfg.loss.top_k, loss_kind=cfg.loss.kind, ds=ds)


# ---------------------------------------------------------------------------------------------
# The estimate of one layout


def _bucket(ds: Dict, key: str, default: float) -> float:
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


def _activation_bytes(model: ModelShape, tokens: int, seq: int, tp: int, w: int, checkpointed: bool) -> float:
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


def runtime_reserve(tp: int, dp: int) -> float:
    """Bytes per GPU that CUDA and NCCL hold outside the caching allocator (estimates, see
    :data:`ASSUMPTIONS`): the context, and NCCL's buffers for each communicator a rank is in (the
    world; the tensor-parallel group and its data-parallel group where both have peers)."""
    communicators = 1 + (tp > 1) + (tp > 1 and dp > 1)
    return (CUDA_CONTEXT_GB + communicators * NCCL_GB_PER_COMMUNICATOR) * GB


def logits_bytes(model: ModelShape, tokens: int, vocab_local: int, w: int, *, device_type: str = "cuda") -> float:
    """The peak of the logits path (heads, loss, backward to the student's last hidden state) in
    units of L, one ``[tokens, V_local]`` tensor of ``w`` bytes: the student's logits and the
    teacher's (donated to the student's gradient) 2 L, with the loss's fp32 row-chunk buffers
    (4 of them, 2 more for the fp32 copies of bf16 chunks); with a final soft-capping (Gemma-2)
    the student's saved ``tanh`` output (1 L) and, in its backward, the gradient through the
    scaling and through ``tanh`` (2 L), which outgrow the loss's buffers."""
    logits = tokens * vocab_local * w
    chunk = min(CPU_CHUNK_NUMEL if device_type == "cpu" else CHUNK_NUMEL, tokens * vocab_local)
    buffers = (4 + (2 if w == 2 else 0)) * 4 * chunk
    if model.final_softcap:
        return 3 * logits + max(buffers, 2 * logits)
    return 2 * logits + buffers


def estimate(job: Job, layout: Layout, cluster: Cluster, *, device_type: str = "cuda") -> Estimate:
    """Memory, traffic and time of ``layout`` for ``job`` on ``cluster`` (see :data:`ASSUMPTIONS`)."""
    tp, stage, micro, accum = (layout.tensor_parallel, layout.student_zero_stage, layout.micro_batch_size,
                               layout.grad_accum)
    dp = cluster.world_size // tp
    w = job.weight_bytes
    grad_bytes = 4  # gradients accumulate in fp32 (the job sets data_types.grad_accum_dtype under bf16)
    student, teacher = job.student.per_rank(tp), job.teacher.per_rank(tp) if job.teacher else 0
    tokens = micro * job.seq_len
    vocab_local = job.student.vocab // tp
    ds = job.ds
    reduce_bucket = _bucket(ds, "reduce_bucket_size", 5e8)
    persistence = _bucket(ds, "stage3_param_persistence_threshold", 1e5)

    memory = dict.fromkeys(MEMORY_TERMS, 0.0)
    # Where the optimizer's fp32 states live: stage 0 keeps them whole on every rank; stages 1 and 2
    # partition them over the data-parallel ranks; stage 3 partitions the TP-split tensors over
    # those and the TP-replicated ones (embedding, norms) over every rank, and keeps tensors under
    # the persistence threshold whole.
    if stage == 3:
        replicated = job.student.replicated
        states = (student - replicated) / dp + replicated / cluster.world_size
    else:
        states = student / dp if stage else student
    memory["student_weights"] = w * (states + job.student.persistent(persistence) if stage == 3 else student)
    # Stage 0 is fp32 only (training.deepspeed_config.stage_problem): the weights are the master copy.
    memory["student_master"] = 4 * states if stage else 0.0
    # Adam's two moments (fp32); on CPU torch's AdamW also makes one partition-sized temporary per step.
    memory["student_optimizer"] = (8 + (4 if device_type == "cpu" else 0)) * states
    # Stages 0 and 1 hold every gradient until the step; stages 2 and 3 their partition (plus a bucket).
    memory["student_gradients"] = grad_bytes * (student if stage <= 1 else states)
    if teacher:
        resident = layout.teacher_placement == "resident" or dp == 1
        memory["teacher_weights"] = w * (teacher if resident else teacher / dp + job.teacher.persistent(persistence))
    memory["activations"] = _activation_bytes(job.student, tokens, job.seq_len, tp, w, layout.activation_checkpointing)
    if teacher:
        memory["activations"] += teacher_forward_bytes(job.teacher, tokens, job.seq_len, tp, w)
    memory["logits"] = logits_bytes(job.student, tokens, vocab_local, w, device_type=device_type)
    # The gradient bucket (its touched part), and under ZeRO-3 the gathered parameters, which stay
    # live up to stage3_max_live_parameters (the whole model, for models below 1e9 parameters).
    live = _bucket(ds, "stage3_max_live_parameters", 1e9)
    buffers = grad_bytes * min(reduce_bucket, student)
    if stage == 3:
        buffers += w * (min(live, student) - states)
    if teacher and layout.teacher_placement == "zero3" and dp > 1:
        buffers += w * (min(live, teacher) - teacher / dp)
    memory["comm_buffers"] = max(buffers, 0.0)

    traffic = dict.fromkeys(TRAFFIC_KINDS, 0.0)
    # DeepSpeed reduces gradients (fp32) even over one data-parallel rank: stages 0 and 1 once per
    # step (an all-reduce), stage 2 every micro-batch (an all-reduce), stage 3 every micro-batch (a
    # reduce-scatter).
    traffic["student_reduce_scatter"] = (1 if stage <= 1 else accum) * grad_bytes * student
    if stage == 3 and cluster.world_size > 1:
        # The TP-replicated tensors are partitioned over every rank: gathered over all of them.
        rest = job.student.replicated - job.student.replicated_persistent(persistence)
        traffic["student_gather"] += accum * w * rest / cluster.world_size
    if dp > 1:
        if stage == 3:
            # Parameters gathered in forward stay gathered through backward unless the model is
            # larger than stage3_max_live_parameters / max_reuse_distance (then gathered again).
            gathers = accum * (1 if student <= live else 2)
            split = student - job.student.replicated
            traffic["student_gather"] += gathers * w * (split - (job.student.persistent(persistence) -
                                                                job.student.replicated_persistent(persistence))) / dp
        elif stage:
            traffic["student_gather"] = w * student / dp  # the updated partitions, once per step
        if teacher and layout.teacher_placement == "zero3":
            traffic["teacher_gather"] = accum * w * (teacher - job.teacher.persistent(persistence)) / dp
    if tp > 1:
        model = job.student
        # Forward: one all-reduce per row-parallel linear; backward: one per column-parallel linear
        # and one for the vocabulary-parallel head's input; checkpointed recomputation repeats the
        # forward's but the last (autograd's early stop: nothing after it is saved).
        per_layer = model.row_parallel + model.column_parallel + (
            model.row_parallel - 1 if layout.activation_checkpointing else 0)
        per_micro = w * model.hidden * (tokens * model.layers * per_layer + micro * (job.seq_len - 1))
        if teacher:
            per_micro += w * tokens * job.teacher.layers * job.teacher.row_parallel * job.teacher.hidden
            # Per position with a target, fp32: the tail loss's statistics (5 + 3K, the student's
            # argmax among them; the teacher's is its first top-K id, or 2 more at K = 0); other
            # kinds' two argmaxes (2 each). Plus the layout check (5 float64 per call).
            if job.loss_kind == "tail":
                k = min(job.top_k, job.student.vocab)
                numbers = 5 + 3 * k + (2 if k == 0 else 0)
            else:
                numbers = 4
            traffic["loss_exchange"] = accum * (micro * (job.seq_len - 1) * 4 * numbers + 40)
        traffic["tp_allreduce"] = accum * per_micro

    flops = 6 * job.student.matmul_params() / tp + (2 * job.student.matmul_params() / tp
                                                    if layout.activation_checkpointing else 0)
    attention = 2 * job.seq_len * job.student.heads * job.student.head_dim * job.student.layers / tp  # causal, forward
    flops += attention * (4 if layout.activation_checkpointing else 3)
    if teacher:
        flops += 2 * job.teacher.matmul_params() / tp + 2 * job.seq_len * job.teacher.heads * job.teacher.head_dim * \
            job.teacher.layers / tp
    seconds = {"compute": flops * tokens * accum / (cluster.tflops * 1e12)}
    dp_bandwidth = (cluster.ib_gbps / cluster.gpus_per_node if cluster.nodes > 1 else cluster.nvlink_gbps) * GB
    wire = {"teacher_gather": dp - 1, "student_gather": dp - 1, "student_reduce_scatter": (dp - 1) / dp,
            "tp_allreduce": 2 * (tp - 1) / tp, "loss_exchange": tp - 1}
    for kind in TRAFFIC_KINDS:
        bandwidth = cluster.nvlink_gbps * GB if kind in ("tp_allreduce", "loss_exchange") else dp_bandwidth
        seconds[kind] = traffic[kind] * wire[kind] / bandwidth
    estimate_ = Estimate(layout=layout, memory=memory, traffic=traffic, seconds=seconds,
                         reserve=runtime_reserve(tp, dp) if device_type == "cuda" else 0.0)
    needed = estimate_.peak_memory_bytes + estimate_.reserve
    if needed > (1 - HEADROOM) * cluster.gpu_memory_gb * GB:
        with_reserve = (f" with {estimate_.reserve / GB:.1f} GB of CUDA context and NCCL buffers"
                        if estimate_.reserve else "")
        estimate_.rejected = (f"needs {needed / GB:.1f} GB per GPU{with_reserve}, more than {1 - HEADROOM:.0%} of the "
                              f"{cluster.gpu_memory_gb:g} GB usable")
    return estimate_


# ---------------------------------------------------------------------------------------------
# Comparing layouts


def layout_problem(job: Job, layout: Layout, cluster: Cluster) -> Optional[str]:
    """Why ``layout`` cannot run ``job`` on ``cluster`` at all (before memory), or None."""
    tp = layout.tensor_parallel
    if cluster.world_size % tp or tp > cluster.gpus_per_node:
        return (f"parallel.tensor_parallel {tp} must divide the {cluster.gpus_per_node} GPUs of a node "
                f"(tensor-parallel groups stay inside a node)")
    for name, model in (("teacher", job.teacher), ("student", job.student)):
        if model is None:
            continue
        for what, count in (("attention heads", model.heads), ("key-value heads", model.kv_heads)):
            if count % tp:
                return f"parallel.tensor_parallel {tp} does not divide the {name}'s {count} {what}"
    problem = stage_problem(layout.student_zero_stage, tensor_parallel=tp, bf16=job.weight_bytes == 2)
    if problem:
        return problem
    dp = cluster.world_size // tp
    if layout.micro_batch_size * layout.grad_accum * dp != job.global_batch:
        return (f"train.micro_batch_size {layout.micro_batch_size} x train.grad_accum {layout.grad_accum} x "
                f"{dp} data-parallel ranks is not the global batch of {job.global_batch} sequences")
    return None


def candidate_layouts(job_for_tp, cluster: Cluster) -> List[Layout]:
    """Every layout at ``job``'s global batch: TP sizes up to a node, both teacher placements, ZeRO
    stages 1-3 (and 0 where it can run: fp32 at TP 1), micro-batches that divide the batch
    (grad_accum adjusted), checkpointing off and on."""
    layouts = []
    for tp in (size for size in (1, 2, 4, 8, 16) if size <= cluster.gpus_per_node):
        dp = cluster.world_size // tp
        job = job_for_tp(tp)
        per_rank = job.global_batch // dp if job.global_batch % dp == 0 else 0
        micros = [m for m in (1, 2, 4, 8, 16, 32) if per_rank and per_rank % m == 0] or [1]
        placements = ("resident", "zero3") if job.teacher is not None else ("resident",)
        stages = [s for s in (0, 1, 2, 3) if not stage_problem(s, tensor_parallel=tp, bf16=job.weight_bytes == 2)]
        for micro in micros:
            for placement in placements:
                for stage in stages:
                    for checkpointing in (False, True):
                        layouts.append(Layout(tp, placement, stage, micro, max(per_rank // micro, 1), checkpointing))
    return layouts


@dataclass
class Plan:
    """The layouts compared, the fastest that fits (``chosen``) and the one asked about (``shown``)."""

    cluster: Cluster
    estimates: List[Estimate]
    chosen: Optional[Estimate]
    shown: Estimate
    smallest_cluster: Optional[Cluster] = None
    """Where nothing fits: the fewest nodes of these GPUs on which something would."""
    deepspeed: Dict[str, object] = field(default_factory=dict)
    """:func:`deepspeed_settings` for ``shown``."""

    def to_json(self) -> dict:
        shown = self.shown
        return {"estimate": True, "assumptions": list(ASSUMPTIONS), "cluster": asdict(self.cluster),
                "memory": shown.memory, "traffic": shown.traffic,
                "peak_memory_bytes": shown.peak_memory_bytes, "reserve_bytes": shown.reserve,
                "step_time_s": shown.step_time_s,
                "seconds": shown.seconds, "bottleneck": shown.bottleneck, "fits": shown.fits,
                "layout": shown.layout.as_config(), "set_arguments": shown.layout.set_arguments(),
                "deepspeed": self.deepspeed,
                "recommended": self.chosen.layout.as_config() if self.chosen else None,
                "smallest_cluster": asdict(self.smallest_cluster) if self.smallest_cluster else None,
                "layouts": [{"layout": e.layout.as_config(), "peak_memory_bytes": e.peak_memory_bytes,
                             "step_time_s": e.step_time_s, "fits": e.fits, "rejected": e.rejected}
                            for e in self.estimates]}


def configured_layout(cfg, cluster: Cluster) -> Layout:
    return Layout(cfg.parallel.tensor_parallel, cfg.parallel.teacher_placement, resolve_student_stage(cfg),
                  cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.activation_checkpointing)


def plan(cfg, cluster: Cluster, *, as_configured: bool = False, bf16: Optional[bool] = None,
         device_type: str = "cuda") -> Plan:
    """Compare every layout of ``cfg`` on ``cluster``; ``shown`` is the fastest that fits, or the
    config's own with ``as_configured`` (or where nothing fits). Raises ConfigError naming the key
    when the config's own layout cannot run on ``cluster`` at all."""
    jobs = {}

    def job_for_tp(tp):
        if tp not in jobs:
            jobs[tp] = job_from_config(cfg, world_size=cluster.world_size, tp=tp, bf16=bf16)
        return jobs[tp]

    own = configured_layout(cfg, cluster)
    problem = layout_problem(job_for_tp(own.tensor_parallel), own, cluster)
    if problem:
        raise ConfigError(f"{problem} (on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs)")
    estimates = []
    for layout in candidate_layouts(job_for_tp, cluster):
        job = job_for_tp(layout.tensor_parallel)
        problem = layout_problem(job, layout, cluster)
        if problem:
            estimates.append(Estimate(layout, dict.fromkeys(MEMORY_TERMS, 0.0), dict.fromkeys(TRAFFIC_KINDS, 0.0),
                                      {"compute": 0.0}, rejected=problem))
        else:
            estimates.append(estimate(job, layout, cluster, device_type=device_type))
    fitting = [e for e in estimates if e.fits]
    # Ties (within 0.1%) go to the larger micro-batch, then to no recomputation, then to the lower stage.
    chosen = min(fitting, key=lambda e: (round(e.step_time_s, 3), -e.layout.micro_batch_size,
                                         e.layout.activation_checkpointing, e.layout.student_zero_stage)) \
        if fitting else None
    own_estimate = estimate(job_for_tp(own.tensor_parallel), own, cluster, device_type=device_type)
    shown = own_estimate if as_configured or chosen is None else chosen
    smallest = None
    if chosen is None:
        smallest = _smallest_cluster(cfg, cluster, bf16=bf16, device_type=device_type)
    return Plan(cluster=cluster, estimates=estimates, chosen=chosen, shown=shown, smallest_cluster=smallest,
                deepspeed=deepspeed_settings(job_for_tp(shown.layout.tensor_parallel), shown.layout))


def _smallest_cluster(cfg, cluster: Cluster, **options) -> Optional[Cluster]:
    """The fewest nodes (up to 64) of ``cluster``'s GPUs on which some layout of ``cfg`` fits (the
    global batch, micro-batch x grad_accum x data-parallel ranks, grows with the cluster)."""
    for nodes in range(cluster.nodes + 1, 65):
        bigger = replace(cluster, nodes=nodes)
        try:
            if plan(cfg, bigger, **options).chosen is not None:
                return bigger
        except ConfigError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Text


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB" if abs(value) >= 0.01 * GB or value == 0 else f"{value / 1e6:.2f} MB"


def describe(result: Plan, *, world_note: str = "") -> List[str]:
    """The plan as text lines (every figure an estimate)."""
    cluster, shown = result.cluster, result.shown
    lines = [f"plan (estimates) for {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, "
             f"{cluster.gpu_memory_gb:g} GB usable each{world_note}",
             f"  {cluster.tflops:g} TFLOP/s achieved per GPU, NVLink {cluster.nvlink_gbps:g} GB/s per GPU, "
             f"InfiniBand {cluster.ib_gbps:g} GB/s per node"]
    compared = len(result.estimates) > 1
    if compared:
        lines.append(f"  compared {len(result.estimates)} layouts, {sum(e.fits for e in result.estimates)} fit")
    which = "fastest that fits" if compared and shown is result.chosen else "as configured"
    lines.append(f"  layout ({which}):")
    lines += [f"    {key}: {value}" for key, value in shown.layout.as_config().items()]
    if result.chosen is not None and shown is not result.chosen:
        lines.append(f"  fastest that fits: {result.chosen.step_time_s:.3f} s/step with "
                     f"{result.chosen.layout.set_arguments()}")
    elif compared and result.chosen is not None:
        lines.append(f"  select it with: {shown.layout.set_arguments()}")
    if result.deepspeed:
        lines.append("  DeepSpeed JSON for it: " + ", ".join(f"{k}: {v}" for k, v in result.deepspeed.items()))
    lines.append(f"  memory per GPU: {_gb(shown.peak_memory_bytes)} of {cluster.gpu_memory_gb:g} GB")
    for term, value in shown.memory.items():
        lines.append(f"    {term:<24} {_gb(value)}")
    if shown.reserve:
        free = cluster.gpu_memory_gb * GB - shown.peak_memory_bytes - shown.reserve
        lines.append(f"    and outside it: CUDA context and NCCL buffers {_gb(shown.reserve)}; "
                     f"free {_gb(free)} ({free / (cluster.gpu_memory_gb * GB):.0%})")
    lines.append("  bytes per step per GPU handed to collectives:")
    for kind, value in shown.traffic.items():
        lines.append(f"    {kind:<24} {_gb(value)}  ({shown.seconds[kind]:.3f} s)")
    lines.append(f"  step time: {shown.step_time_s:.3f} s (compute {shown.seconds['compute']:.3f} s); "
                 f"bottleneck: {shown.bottleneck}")
    if not shown.fits:
        lines.append(f"  WARNING: this layout will not fit: {shown.rejected}")
    if compared and result.chosen is None:
        where = (f"{result.smallest_cluster.nodes} node(s) x {result.smallest_cluster.gpus_per_node}"
                 if result.smallest_cluster else "no cluster of up to 64 such nodes")
        lines.append(f"  no layout fits on this cluster; the smallest that would: {where}")
    lines.append("  assumptions:")
    lines += [f"    - {assumption}" for assumption in ASSUMPTIONS]
    return lines


# ---------------------------------------------------------------------------------------------
# The job's own plan


def job_cluster(world_size: int, device) -> Cluster:
    """The cluster the job runs on, as far as a process can see it: GPUs per node from the
    launcher's ``LOCAL_WORLD_SIZE`` (else the visible devices), the accelerator's memory (on CPU the
    host memory shared by the node's ranks); throughput and links at :class:`Cluster`'s defaults."""
    import psutil
    import torch

    device = torch.device(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (
        torch.cuda.device_count() if device.type == "cuda" else world_size)
    local = local if local and world_size % local == 0 else world_size
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = psutil.virtual_memory().total / local
    return Cluster(nodes=world_size // local, gpus_per_node=local, gpu_memory_gb=memory / GB)


def job_plan(cfg, *, world_size: int, bf16: bool, device) -> Plan:
    """The plan of the job's own layout on the cluster it runs on (``plan(..., as_configured=True)``)."""
    import torch

    cluster = job_cluster(world_size, device)
    layout = configured_layout(cfg, cluster)
    job = job_from_config(cfg, world_size=world_size, bf16=bf16)
    problem = layout_problem(job, layout, cluster)
    if problem:
        raise ConfigError(problem)
    own = estimate(job, layout, cluster, device_type=torch.device(device).type)
    return Plan(cluster=cluster, estimates=[own], chosen=own if own.fits else None, shown=own)
