"""DeepSpeed JSON, completed from the run config and checked against it.

The run config owns batch sizes, optimizer, schedule, clipping, precision and the tensor-parallel
size. A DeepSpeed file may leave those out or set them to ``"auto"``; a value it sets explicitly
must equal the run config's, or :class:`ConfigError` names both. A key that makes DeepSpeed
JIT-build an op this machine cannot build is refused by name (:mod:`training.jit_ops`).
"""

import copy
import json
from typing import NamedTuple

from data.loader import global_batch_size
from training.config import ConfigError, RunConfig
from training.jit_ops import check_buildable

AUTO = "auto"


def _put(ds: dict, dotted: str, value, source: str) -> None:
    node, keys = ds, dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    current = node.get(keys[-1], AUTO)
    if current != AUTO and current != value:
        raise ConfigError(f"{source}: {dotted} is {current!r} but the run config implies {value!r}; remove it, set "
                          f"it to \"auto\" or make the two agree")
    node[keys[-1]] = value


class DeepSpeedConfigs(NamedTuple):
    """The DeepSpeed dicts a job builds its engines from, complete and never edited later."""

    student: dict
    """The trainable student's engine: optimizer, scheduler, clipping (and ``checkpoint.load_universal``
    when resuming a checkpoint of another layout)."""
    teacher: dict
    """The frozen teacher's engine: no optimizer or scheduler; ZeRO stage 0 for a resident teacher
    (``parallel.teacher_placement``), else ZeRO-3 as :attr:`frozen`."""
    zero_only: dict
    """Without the tensor-parallel section: what ``HfDeepSpeedConfig`` sees while models load
    partitioned; ``deepspeed.initialize`` then applies AutoTP with the full configs."""
    frozen: dict
    """A frozen ZeRO-3 engine (a student built for evaluation; a ``zero3`` teacher)."""

    @property
    def teacher_resident(self) -> bool:
        return self.teacher["zero_optimization"]["stage"] == 0

    @property
    def student_stage(self) -> int:
        return self.student["zero_optimization"]["stage"]


def read_deepspeed_json(source: str) -> dict:
    """The DeepSpeed JSON file ``source`` as written, a new dict on every call (callers complete it in
    place). Raises :class:`ConfigError` naming ``parallel.deepspeed_config`` when the file is missing
    or is not valid JSON."""
    try:
        with open(source) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"parallel.deepspeed_config: file not found: {source}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"parallel.deepspeed_config: {source} is not valid JSON ({error.msg}, line {error.lineno})"
                          ) from None


def _complete_common(ds: dict, source: str, *, tp: int, world_size: int, micro_batch_size: int, grad_accum: int,
                     bf16: bool) -> None:
    """What frozen and trainable engines share: layout, batch, precision; checked against the run."""
    if world_size % tp:
        raise ConfigError(f"parallel.tensor_parallel: {tp} does not divide the world size {world_size}")
    if tp > 1 and ds.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) > 1:
        # Measured (DESIGN.md §5): transformers opens a second zero.Init inside ours and start-up stops;
        # forced past that, hpZ's groups coincide with the tensor-parallel groups and the teacher's
        # logits come out wrong. With TP = GPUs per node there is no intra-node DP group for hpZ anyway.
        raise ConfigError(f"{source}: zero_optimization.zero_hpz_partition_size > 1 does not work with "
                          f"tensor parallelism (parallel.tensor_parallel={tp}): its groups coincide with the "
                          f"tensor-parallel ones and the logits come out wrong; remove it or set it to 1")
    _put(ds, "train_micro_batch_size_per_gpu", micro_batch_size, source)
    _put(ds, "gradient_accumulation_steps", grad_accum, source)
    # DeepSpeed derives the global batch from the two above; at config time it does not yet know the
    # tensor-parallel groups and would check it against every rank.
    global_batch = global_batch_size(micro_batch_size, grad_accum, world_size // tp)
    if ds.pop("train_batch_size", AUTO) not in (AUTO, global_batch):
        raise ConfigError(f"{source}: train_batch_size disagrees with train.micro_batch_size x train.grad_accum x "
                          f"data-parallel size; remove it or set it to \"auto\"")
    _put(ds, "tensor_parallel.autotp_size", tp, source)
    _put(ds, "tensor_parallel.vocab_parallel_lm_head", True, source)
    _put(ds, "bf16.enabled", bf16, source)
    if bf16:
        # Otherwise ZeRO accumulates gradients over micro-batches in bf16 (8 mantissa bits).
        _put(ds, "data_types.grad_accum_dtype", "fp32", source)
    ds.setdefault("steps_per_print", 10**9)  # the job logs; DeepSpeed's own step prints are noise
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer (on by default, synchronized) waits for the device at the start
    # and end of every micro-batch's forward-to-step; nothing here reads it (the job times its steps).
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)


def _frozen(ds: dict) -> dict:
    """A frozen ZeRO-3 engine's config: no optimizer, scheduler or checkpoint loading."""
    frozen = copy.deepcopy(ds)
    for key in ("optimizer", "scheduler", "gradient_clipping", "checkpoint"):
        frozen.pop(key, None)
    frozen.setdefault("zero_optimization", {})["stage"] = 3
    return frozen


def _student_stage(ds: dict, cfg: RunConfig, source: str) -> int:
    """The student's ZeRO stage: the JSON's, or ``parallel.student_zero_stage`` where it says "auto".

    ``parallel.student_zero_stage: auto`` is the planner's to resolve (``training.auto_stage``, which
    the job runs first: the planner imports this module). A caller that builds engines from such a
    config without it (tests, benchmarks) gets what an absent value gives: the JSON's stage, else 3."""
    stage, chosen = ds.get("zero_optimization", {}).get("stage", AUTO), cfg.parallel.student_zero_stage
    chosen = None if chosen == AUTO else chosen
    if stage == AUTO:
        return 3 if chosen is None else chosen
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2, 3 or \"auto\" for the student, "
                          f"got {stage!r}")
    if chosen is not None and chosen != stage:
        raise ConfigError(f"parallel.student_zero_stage is {chosen} but {source} sets zero_optimization.stage "
                          f"{stage}; set the JSON's stage to \"auto\" or make the two agree")
    return stage


def stage_problem(stage: int, *, tensor_parallel: int, bf16: bool):
    """Why the student cannot train at ZeRO ``stage`` in this layout, or None.

    Stage 0 (DeepSpeed's plain data parallelism) is fp32 at TP 1 only: DeepSpeed 0.19.8 accumulates a
    stage-0 bf16 model's gradients in bf16 (the job keeps them fp32), and its stage-0 gradient
    norm does not count AutoTP's shards (they carry no model-parallel mark), so clipping at TP > 1
    would use a wrong norm.
    """
    if stage != 0:
        return None
    if bf16:
        return ("the student's ZeRO stage 0 (plain data parallelism) trains in fp32 only, and this run is bf16 "
                "(train.dtype bf16, or auto on a bf16 GPU); use stage 1 or train.dtype fp32")
    if tensor_parallel > 1:
        return (f"the student's ZeRO stage 0 (plain data parallelism) needs parallel.tensor_parallel 1, got "
                f"{tensor_parallel}; use stage 1")
    return None


def _resident(frozen: dict) -> dict:
    """A frozen engine that keeps its (tensor-parallel) parameters whole: ZeRO stage 0 + AutoTP."""
    resident = copy.deepcopy(frozen)
    resident["zero_optimization"] = {"stage": 0}
    resident.pop("data_types", None)  # no gradients to accumulate
    return resident


def _zero_only(ds: dict) -> dict:
    return {key: value for key, value in ds.items() if key not in ("tensor_parallel", "checkpoint")}


def _torch_adamw(params: dict, *, universal: bool) -> None:
    """torch's AdamW through DeepSpeed (``torch_adam``) unless the JSON says otherwise: DeepSpeed's
    own Adam is an op it JIT-builds (FusedAdam: nvcc; CPU Adam: a C++ build of minutes).

    On CUDA torch's fused kernel (``fused``; DeepSpeed passes the key on to ``torch.optim.AdamW``),
    unless the JSON sets ``foreach`` or the run loads a universal checkpoint: DeepSpeed 0.19.8 puts
    that checkpoint's ``step`` on the host as it is (``ds_to_universal`` loads to CPU; ZeRO's
    universal load assigns it into the optimizer state, past ``load_state_dict``), and the fused
    kernel keeps its steps on the parameters' device; torch's default foreach update takes a host
    step. On CPU torch's fused kernel too: its default there is a Python loop of about ten ops per
    parameter tensor (foreach is CUDA-only), which is most of a ZeRO-0 step on a small model."""
    from model_parallel.devices import accelerator_kind

    params.setdefault("torch_adam", True)
    if params["torch_adam"] and accelerator_kind() in ("cuda", "cpu") and not universal and not params.get("foreach"):
        params.setdefault("fused", True)


def resolve_student_stage(cfg: RunConfig) -> int:
    """The student's ZeRO stage this run will use (see ``parallel.student_zero_stage``)."""
    source = cfg.parallel.deepspeed_config
    return _student_stage(read_deepspeed_json(source), cfg, source)


def build_deepspeed_configs(cfg: RunConfig, world_size: int, bf16: bool, *, universal: bool = False
                            ) -> DeepSpeedConfigs:
    """The configs for ``world_size`` ranks; ``universal`` loads a checkpoint of another layout."""
    source = cfg.parallel.deepspeed_config
    ds = read_deepspeed_json(source)
    train = cfg.train
    _complete_common(ds, source, tp=cfg.parallel.tensor_parallel, world_size=world_size,
                     micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum, bf16=bf16)
    stage = ds.setdefault("zero_optimization", {})["stage"] = _student_stage(ds, cfg, source)
    problem = stage_problem(stage, tensor_parallel=cfg.parallel.tensor_parallel, bf16=bf16)
    if problem:
        raise ConfigError(f"parallel.student_zero_stage / {source}: zero_optimization.stage: {problem}")
    _put(ds, "gradient_clipping", train.grad_clip, source)
    _put(ds, "optimizer.type", "AdamW", source)
    _put(ds, "optimizer.params.lr", train.lr, source)
    _put(ds, "optimizer.params.weight_decay", train.weight_decay, source)
    _put(ds, "scheduler.type", "WarmupCosineLR", source)
    _put(ds, "scheduler.params.total_num_steps", train.max_steps, source)
    _put(ds, "scheduler.params.warmup_num_steps", train.warmup_steps, source)
    _put(ds, "scheduler.params.warmup_min_ratio", 0.0, source)
    _put(ds, "scheduler.params.warmup_type", "linear", source)
    _put(ds, "scheduler.params.cos_min_ratio", train.min_lr / train.lr, source)
    _torch_adamw(ds["optimizer"].setdefault("params", {}), universal=universal)
    if universal:
        _put(ds, "checkpoint.load_universal", True, source)
    check_buildable(ds, source)  # before any engine is built
    frozen = _frozen(ds)
    teacher = _resident(frozen) if cfg.parallel.teacher_placement == "resident" else frozen
    return DeepSpeedConfigs(student=ds, teacher=teacher, zero_only=_zero_only(frozen), frozen=frozen)


def frozen_deepspeed_configs(source: str, *, tensor_parallel: int, world_size: int, micro_batch_size: int,
                             bf16: bool) -> DeepSpeedConfigs:
    """Configs for frozen engines only (evaluation): ``student`` is frozen too."""
    ds = read_deepspeed_json(source)
    _complete_common(ds, source, tp=tensor_parallel, world_size=world_size, micro_batch_size=micro_batch_size,
                     grad_accum=1, bf16=bf16)
    frozen = _frozen(ds)
    check_buildable(frozen, source)  # before any engine is built
    return DeepSpeedConfigs(student=frozen, teacher=_resident(frozen), zero_only=_zero_only(frozen), frozen=frozen)
