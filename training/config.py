"""The run config: YAML → typed, validated dataclasses; errors name the key.

    cfg = load_config("launch/configs/demo_distill.yaml", overrides=["train.max_steps=20", "student.path=null"])

``overrides`` are ``key=value`` with the value parsed as a YAML scalar. Unknown keys, wrong types
and bad values raise :class:`ConfigError` naming the dotted key. DeepSpeed's own JSON stays
DeepSpeed's (``parallel.deepspeed_config``); :mod:`training.deepspeed_config` fills in the values this
config owns and checks that the two agree.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from core.errors import ConfigError
from loss.registry import LOSSES


@dataclass
class ModelSource:
    path: Optional[str] = None
    """HF model directory or hub id."""
    trust_remote_code: bool = False
    """Allow the model repository's own code; requires ``revision`` to pin it."""
    revision: Optional[str] = None
    """Hub revision (commit) to load."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """``auto``: what transformers picks for the architecture and the installed packages (sdpa for
    Llama; eager for Gemma-2, whose attention soft-capping sdpa cannot apply)."""


@dataclass
class TeacherConfig(ModelSource):
    """The frozen teacher; ``path`` is required unless loss.kind is ce."""


@dataclass
class StudentConfig(ModelSource):
    """The student: from ``path`` (pretrained) or ``config`` (fresh), exactly one of them."""

    config: Optional[str] = None
    """HF config file (config.json) to initialise a fresh student from."""


@dataclass
class DataConfig:
    train: Optional[str] = None
    """Directory written by ``data.prepare``, or raw .txt/.jsonl/.parquet prepared on the fly."""
    eval: Optional[str] = None
    """Like ``train``; optional."""
    format: Literal["text", "sft"] = "text"
    """Format for raw files prepared on the fly."""
    seq_len: int = 512
    """Sequence length for raw files prepared on the fly (prepared directories carry their own)."""


@dataclass
class LossConfig:
    kind: str = "tail"
    """One of :data:`loss.registry.LOSSES` (tail, topk_bucket, kl, reverse_kl, ce)."""
    top_k: int = 10
    """K, for kinds tail and topk_bucket."""
    beta: float = 2.0
    """Tail weight β, for kind tail (topk_bucket is β = 0 and ignores it)."""
    beta_mode: Literal["constant", "sequence"] = "constant"
    """``sequence``: β_t = β · P_tail,t / mean of P_tail over the sequence's valid tokens."""
    temperature: float = 1.0
    ce_weight: float = 0.0
    """loss = (1 − ce_weight)·τ²·D + ce_weight·CE; ignored for kind ce."""
    fused_head: Union[Literal["auto"], bool] = "auto"
    """Apply both output layers inside the loss, in token chunks, so no ``[tokens, V_local]`` logits
    outlive a chunk (``training.fused_head``). ``auto``: wherever ``training.models`` supports it
    (said once at start where it does not); ``true``: refused by name where unsupported; ``false``:
    the unfused path. How, not what, is computed: a resume may change it."""


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): on some steps the student writes the continuations the loss is
    taken on, and the teacher scores them (:mod:`training.on_policy`)."""

    fraction: float = 0.0
    """λ: each optimizer step is on-policy with probability λ, drawn from (seed, step) alone (no
    saved state). 0: every step trains on the data, exactly as without this section."""
    prompt_tokens: int = 32
    """Text blocks: the leading tokens of each block that are the prompt. SFT rows use their own
    prompt (its last ``seq_len − max_new_tokens`` tokens where it is longer)."""
    max_new_tokens: int = 64
    """Every continuation is this long (no early exit); tokens after the first EOS weigh 0."""
    temperature: float = 1.0
    """Sampling temperature of the student's generation; 0: greedy."""
    loss_on_prompt: bool = False
    """Also take the loss on the prompt's tokens (data tokens), not only on the continuation."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps of the whole schedule."""
    stop_at_step: Optional[int] = None
    """End cleanly (after a checkpoint) at this step without changing the schedule."""
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_consecutive_skips: int = 10
    """Steps with non-finite loss or gradients are skipped (on every rank); this many in a row stop
    the job."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 where the accelerator supports it, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute the student's layer activations in backward (Hugging Face gradient checkpointing,
    non-reentrant): less activation memory for about one more student forward."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size: both models' vocabularies are split over this many ranks."""
    timeout_s: int = 1800
    """Collective timeout: a rank waiting longer for a dead peer fails instead of hanging."""
    deepspeed_config: str = "ds_configs/zero3_tp.json"
    """DeepSpeed JSON (ZeRO + AutoTP); values this config owns are filled in."""
    student_zero_stage: Union[Literal["auto"], int, None] = None
    """The student's ZeRO stage (0, 1, 2 or 3) where the DeepSpeed JSON's ``zero_optimization.stage``
    is ``"auto"`` or absent (then 3); a JSON stage that differs is refused. 0 is DeepSpeed's plain
    data parallelism (every rank holds the whole optimizer state; fp32 at ``tensor_parallel`` 1 only).
    ``auto``: the job takes the planner's fastest stage that fits for its own layout (the JSON's
    stage where it sets one; the checkpoint's on a resume) and prints the choice
    (:func:`training.auto_stage.resolve_auto_stage`)."""
    teacher_placement: Literal["resident", "zero3"] = "resident"
    """``resident``: each rank keeps its tensor-parallel shard of the frozen teacher whole for the
    whole run (ZeRO stage 0 + AutoTP), so its forward moves no parameter bytes, only the TP
    all-reduces. ``zero3``: the shard is ZeRO-3 partitioned over the data-parallel ranks as well
    and re-gathered every micro-batch (saves memory, costs traffic)."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (and at stop_at_step / the end)."""
    keep: int = 2
    """Complete checkpoints to keep."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint, if any), ``never``, or a checkpoint directory."""
    fallback: bool = False
    """If ``latest`` is missing, empty, dangling or corrupt, resume from the newest verified tag."""
    allow_config_change: str = ""
    """Comma-separated run-identity keys (e.g. ``loss.beta``) a resume may change."""
    allow_batch_change: bool = False
    """Allow resuming with another global batch size (the sample stream then differs from the
    straight run's)."""


@dataclass
class LoggingConfig:
    every: int = 1
    """Log scalars every this many steps."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on data.eval every this many steps (0: only at the end)."""
    max_batches: int = 20
    """Evaluation batches per rank (0: the whole eval split)."""


@dataclass
class RunConfig:
    output_dir: str = "runs/distill"
    seed: int = 0
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub id; defaults to the teacher's (or the student's)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def __post_init__(self):
        _check_section_values(self)


def _check_section_values(cfg: "RunConfig") -> None:
    if cfg.loss.kind not in LOSSES:
        raise ConfigError(f"loss.kind: must be one of {', '.join(LOSSES)}, got {cfg.loss.kind!r}")
    positive = {
        "train.max_steps": cfg.train.max_steps, "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum, "train.warmup_steps": cfg.train.warmup_steps,
        "parallel.tensor_parallel": cfg.parallel.tensor_parallel, "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep, "logging.every": cfg.logging.every, "data.seq_len": cfg.data.seq_len,
        "loss.temperature": cfg.loss.temperature, "train.lr": cfg.train.lr,
        "parallel.timeout_s": cfg.parallel.timeout_s,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    for key, value in {"loss.top_k": cfg.loss.top_k, "loss.beta": cfg.loss.beta, "train.min_lr": cfg.train.min_lr,
                       "train.weight_decay": cfg.train.weight_decay, "train.grad_clip": cfg.train.grad_clip,
                       "train.max_consecutive_skips": cfg.train.max_consecutive_skips,
                       "eval.every": cfg.eval.every, "eval.max_batches": cfg.eval.max_batches}.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    if cfg.parallel.student_zero_stage not in (None, "auto", 0, 1, 2, 3):
        raise ConfigError(f"parallel.student_zero_stage: must be 0, 1, 2, 3 or auto, got "
                          f"{cfg.parallel.student_zero_stage!r}")
    if not 0 <= cfg.loss.ce_weight <= 1:
        raise ConfigError(f"loss.ce_weight: must be in [0, 1], got {cfg.loss.ce_weight!r}")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"train.min_lr: must be <= train.lr ({cfg.train.lr}), got {cfg.train.min_lr}")
    if cfg.train.warmup_steps > cfg.train.max_steps:
        raise ConfigError(f"train.warmup_steps: must be <= train.max_steps ({cfg.train.max_steps}), "
                          f"got {cfg.train.warmup_steps}")
    if cfg.train.stop_at_step is not None and not 0 < cfg.train.stop_at_step <= cfg.train.max_steps:
        raise ConfigError(f"train.stop_at_step: must be in [1, train.max_steps={cfg.train.max_steps}], "
                          f"got {cfg.train.stop_at_step}")
    if (cfg.student.path is None) == (cfg.student.config is None):
        raise ConfigError("student: set exactly one of student.path and student.config "
                          f"(got path={cfg.student.path!r}, config={cfg.student.config!r})")
    if LOSSES[cfg.loss.kind].needs_teacher and cfg.teacher.path is None:
        raise ConfigError(f"teacher.path: required for loss.kind {cfg.loss.kind!r}")
    if cfg.data.train is None:
        raise ConfigError("data.train: required")
    _check_on_policy(cfg)
    for section in ("teacher", "student"):
        model = getattr(cfg, section)
        if model.trust_remote_code and not model.revision:
            raise ConfigError(f"{section}.trust_remote_code: requires {section}.revision to pin the code it runs")


def _check_on_policy(cfg: "RunConfig") -> None:
    on_policy = cfg.on_policy
    if not 0 <= on_policy.fraction <= 1:
        raise ConfigError(f"on_policy.fraction: must be in [0, 1], got {on_policy.fraction!r}")
    for key in ("prompt_tokens", "max_new_tokens"):
        if getattr(on_policy, key) < 1:
            raise ConfigError(f"on_policy.{key}: must be >= 1, got {getattr(on_policy, key)!r}")
    if on_policy.temperature < 0:
        raise ConfigError(f"on_policy.temperature: must be >= 0 (0: greedy), got {on_policy.temperature!r}")
    if on_policy.fraction == 0:
        return
    if not LOSSES[cfg.loss.kind].needs_teacher:
        raise ConfigError(f"on_policy.fraction: loss.kind {cfg.loss.kind!r} has no teacher to score the student's "
                          f"own samples (cross-entropy on them would teach the student what it already wrote); "
                          f"use a divergence, or on_policy.fraction 0")
    if cfg.loss.ce_weight > 0:
        raise ConfigError(f"loss.ce_weight: must be 0 with on_policy.fraction > 0 (got {cfg.loss.ce_weight}): "
                          f"cross-entropy on the student's own samples teaches it what it already wrote")


def _coerce(value, annotation, key: str):
    """``value`` checked against the field's annotation (ints accepted where floats are expected)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X], or a choice of types (the first that takes the value)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:
            return _coerce(value, choices[0], key)
        for choice in choices:
            try:
                return _coerce(value, choice, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: must be {' or '.join(map(_describe, choices))}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _describe(annotation) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(map(str, typing.get_args(annotation)))
    return "true or false" if annotation is bool else annotation.__name__


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid keys here: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hints[name], prefix + name)
    return cls(**values)


def parse_override(text: str):
    """``"a.b=value"`` → (["a", "b"], value parsed as a YAML scalar)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def load_config(path: str, overrides=()) -> RunConfig:
    """Read ``path`` (YAML), apply ``overrides`` (``key=value``) and validate."""
    try:
        with open(path) as source:
            raw = yaml.safe_load(source) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    for override in overrides:
        keys, value = parse_override(override)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys[:depth + 1])}: is not a section, cannot set {override!r}")
        node[keys[-1]] = value
    return _build(RunConfig, raw, "")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# Keys that change how, not what, is computed: a resume may change them freely.
_SAME_MATH = ("attn_implementation", "fused_head")


def identity(cfg: RunConfig) -> dict:
    """The keys a checkpoint must agree on to be resumed: models, tokenizer, loss, data and on-policy."""
    flat = {}
    for section in ("teacher", "tokenizer", "loss", "data", "on_policy"):
        value = getattr(cfg, section)
        if dataclasses.is_dataclass(value):
            flat.update({f"{section}.{k}": v for k, v in dataclasses.asdict(value).items() if k not in _SAME_MATH})
        else:
            flat[section] = value
    flat["seed"] = cfg.seed
    return flat
