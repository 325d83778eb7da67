"""What a plan is computed from: the cluster, a layout of the job on it, and the job itself (the parts
of a run config the plan reads, its models shaped by :mod:`training.plan.shape`)."""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from core.errors import ConfigError
from data.loader import global_batch_size
from loss.registry import divergence
from training.deepspeed_config import read_deepspeed_json
from training.plan.shape import ModelShape, aligned_vocab, architecture_source, model_shape

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """The cluster a plan is for: ``gpu_memory_gb`` usable per GPU, ``tflops`` achieved dense bf16
    per GPU, ``nvlink_gbps`` GB/s per GPU and ``ib_gbps`` GB/s per node, each direction, and
    ``hbm_gbps`` the GPU memory's bandwidth in GB/s (only on-policy generation reads it: a decode
    step reads every weight and the KV cache for a few rows; default an H100 SXM's nominal 3.35
    TB/s, an H200's is 4.8)."""

    nodes: int = 2
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    tflops: float = 400.0
    nvlink_gbps: float = 450.0
    ib_gbps: float = 200.0
    hbm_gbps: float = 3350.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


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


@dataclass(frozen=True)
class Generation:
    """An on-policy job's generation (``on_policy.fraction`` λ > 0), as the plan counts it: on a step
    that is on-policy (probability λ), each micro-batch's prompts of ``prompt_tokens`` tokens get
    ``new_tokens`` tokens from the student before the step's forwards (:mod:`training.on_policy`)."""

    fraction: float
    """λ: the share of optimizer steps that generate (the expected cost is λ × one generating step's)."""
    prompt_tokens: int
    """P as planned: ``on_policy.prompt_tokens`` for text blocks; for SFT rows (and where the data is not
    prepared yet, its format unknown) the bound ``seq_len − max_new_tokens`` (a row's prompt is at most that)."""
    new_tokens: int
    """N: ``on_policy.max_new_tokens`` (every continuation is that long: no early exit)."""
    prompt_source: str
    """Where P comes from: ``text`` (``prompt_tokens``) or ``sft`` (the bound ``seq_len − N``), read from the
    prepared data's manifest, else from ``data.format`` (the format the job will prepare it in)."""


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
    fused_head: bool = False
    """The loss applies both output layers itself, in chunks (``loss.fused_head``, :func:`fused_head`)."""
    generation: Optional[Generation] = None
    """On-policy generation (None: an off-policy job, planned exactly as without the ``on_policy`` section)."""


def _manifest(cfg) -> Optional[Dict]:
    """The prepared training data's manifest, or None where the data is not prepared yet."""
    manifest = os.path.join(cfg.data.train or "", "manifest.json")
    if not os.path.isfile(manifest):
        return None
    with open(manifest) as handle:
        return json.load(handle)


def _seq_len(cfg) -> int:
    """The prepared training data's sequence length (its manifest) where it exists, else ``data.seq_len``."""
    manifest = _manifest(cfg)
    if manifest is not None:
        return int(manifest.get("seq_len", cfg.data.seq_len))
    return cfg.data.seq_len


def on_policy_generation(cfg, seq_len: int) -> Optional[Generation]:
    """The :class:`Generation` of ``cfg``'s ``on_policy`` section over sequences of ``seq_len`` tokens,
    or None at λ = 0. Raises ConfigError naming the key where the continuation does not fit the
    sequence (text: ``prompt_tokens + max_new_tokens > seq_len``; any data: no room for a prompt)."""
    section = cfg.on_policy
    if section.fraction == 0:
        return None
    new = section.max_new_tokens
    if new >= seq_len:
        raise ConfigError(f"on_policy.max_new_tokens: {new} leaves no room for a prompt in the data's "
                          f"{seq_len}-token sequences")
    manifest = _manifest(cfg)
    # Not prepared yet: the format the job will prepare it in (data.format).
    source = cfg.data.format if manifest is None else manifest.get("format", "text")
    if source != "text":
        return Generation(section.fraction, seq_len - new, new, source)
    if section.prompt_tokens + new > seq_len:
        raise ConfigError(f"on_policy.prompt_tokens: {section.prompt_tokens} + on_policy.max_new_tokens {new} "
                          f"exceed the data's {seq_len}-token blocks")
    return Generation(section.fraction, section.prompt_tokens, new, source)


def fused_head(setting, shapes) -> bool:
    """Whether the job takes the fused head, as ``training.fused_head.install`` decides it:
    ``loss.fused_head`` true (the job refuses to start where it cannot run), false, or ``auto``: on
    where every model's family supports it (:attr:`ModelShape.fused_head`)."""
    if isinstance(setting, bool):
        return setting
    return all(shape.fused_head for shape in shapes)


def job_from_config(cfg, *, world_size: int, tp: Optional[int] = None, bf16: Optional[bool] = None) -> Job:
    """The plan's view of ``cfg`` (a :class:`training.config.RunConfig`) on ``world_size`` GPUs,
    its models counted for tensor-parallel size ``tp`` (default: the config's); ``bf16`` where the
    caller knows it (default: ``train.dtype`` bf16 or auto)."""
    tp = tp or cfg.parallel.tensor_parallel
    sources = {"student": architecture_source(cfg.student, "student")}
    if divergence(cfg.loss.kind).needs_teacher:
        sources["teacher"] = architecture_source(cfg.teacher, "teacher")
    vocab = aligned_vocab(sources.values(), tp)
    shapes = {name: model_shape(source, vocab=vocab, tp=tp, attn_implementation=getattr(cfg, name).attn_implementation)
              for name, source in sources.items()}
    config_dp = world_size // cfg.parallel.tensor_parallel
    bf16 = cfg.train.dtype in ("bf16", "auto") if bf16 is None else bf16
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config).get("zero_optimization", {})
    seq_len = _seq_len(cfg)
    return Job(teacher=shapes.get("teacher"), student=shapes["student"], seq_len=seq_len,
               global_batch=global_batch_size(cfg.train.micro_batch_size, cfg.train.grad_accum, max(config_dp, 1)),
               weight_bytes=2 if bf16 else 4, top_k=cfg.loss.top_k, loss_kind=cfg.loss.kind, ds=ds,
               fused_head=fused_head(cfg.loss.fused_head, shapes.values()),
               generation=on_policy_generation(cfg, seq_len))
