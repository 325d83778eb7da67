"""Build the frozen teacher and the trainable student as DeepSpeed engines with AutoTP.

A ZeRO-3 model (the student at stage 3, a ``zero3`` teacher, an evaluated student) is created
under a ZeRO-3-only ``HfDeepSpeedConfig`` / ``zero.Init`` so that no rank ever holds a full copy;
a resident teacher and a ZeRO-1/2 student load whole on the host. ``deepspeed.initialize`` then
applies AutoTP with a vocabulary-parallel LM head: both engines return logits sliced identically
over the tensor-parallel group.
"""

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from data.manifest import tokenizer_fingerprint
from loss.registry import LOSSES
from model_parallel import VocabShard, resolve_vocab_shard
from model_parallel.devices import accelerator_kind
from model_parallel.distributed import accelerator_device
from training.config import ConfigError, RunConfig, StudentConfig, TeacherConfig
from training.deepspeed_config import DeepSpeedConfigs
from training.fused_head import FusedHeads, install
from training.models import aligned_vocab_size, load_model_config, untie_head, unties_head
from training.plain_optimizer import plain_data_parallel


@dataclass
class Engines:
    student: object
    """The student's DeepSpeed engine (optimizer, scheduler, checkpoints)."""
    teacher: object
    """The frozen teacher's engine (no optimizer), or None for loss.kind ce."""
    tokenizer: object
    vocab_size: int
    """Padded vocabulary size shared by both heads (a multiple of the tensor-parallel size)."""
    real_vocab_size: int
    """len(tokenizer): logit columns at or past it are padding, masked to -inf."""
    vocab_start: int
    """Global id of this rank's first logit column."""
    vocab_shard: VocabShard
    """This rank's slice of both heads (``vocab_start`` onwards), resolved collectively once here:
    the step's loss takes it instead of checking the layout (a collective and a host sync) per call."""
    tp_group: object
    dp_group: object
    dp_rank: int
    dp_size: int
    device: torch.device
    """The accelerator device both engines compute on: every batch and every tensor of the step goes here."""
    fused: Optional[FusedHeads] = None
    """The heads applied inside the loss (``loss.fused_head``), or None: the step's unfused path."""


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # OSError/ValueError/hub errors: one message for the user
        raise ConfigError(f"tokenizer: could not load {name!r}: {str(error).splitlines()[0]}") from None


def resolve_tokenizer(tokenizer: Optional[str], teacher_path: Optional[str], student_path: Optional[str]):
    """The run's tokenizer (``tokenizer``, else the teacher's, else the student's); refuses a
    teacher or student directory that ships a different one."""
    name = tokenizer or teacher_path or student_path
    if name is None:
        raise ConfigError("tokenizer: required when the student starts from student.config and there is no teacher")
    tokenizer = _load_tokenizer(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    expected = tokenizer_fingerprint(tokenizer)
    for key, path in (("teacher.path", teacher_path), ("student.path", student_path)):
        if path and path != name and os.path.isdir(path) and any(
                os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            other = _load_tokenizer(path)
            if tokenizer_fingerprint(other) != expected:
                raise ConfigError(f"{key}: {path} ships a tokenizer whose token→id map differs from {name!r}; "
                                  f"teacher and student must share one tokenizer")
    return tokenizer


def _init_added_rows(model, first_added: int, seed: int) -> None:
    """Give the rows ``resize_token_embeddings`` added (``first_added`` onwards, in the embedding
    and an untied head) values drawn from ``seed`` alone: bitwise the same on every rank and at every
    tensor-parallel size. Left to transformers under ZeRO-3 they differ between ranks, and a
    checkpoint's replicated embedding then cannot be re-laid out. Collective (ZeRO-3 gather).

    They are padding (at or past ``len(tokenizer)``): their logits are masked and no input holds
    their ids, so any finite values would train the same; random ones match a fresh init.
    """
    import deepspeed

    std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
    weights = {id(module.weight): module.weight for module in (model.get_input_embeddings(),
                                                               model.get_output_embeddings()) if module is not None}
    for offset, weight in enumerate(weights.values()):
        # transformers builds the resized matrices unpartitioned, so each rank holds its own copy
        # until deepspeed.initialize partitions it: every rank writes the same values (a
        # ZeRO-partitioned one is gathered, and rank 0's write is what it keeps).
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            generator = torch.Generator(device="cpu").manual_seed(seed + offset)
            rows = torch.empty(weight.shape[0] - first_added, weight.shape[1], dtype=torch.float32,
                               device="cpu").normal_(0.0, std, generator=generator)
            weight.data[first_added:] = rows.to(device=weight.device, dtype=weight.dtype)


def _draw_fresh_weights(model, seed: int) -> None:
    """Draw a model built from a config again from ``seed`` alone: bitwise the same weights at every
    ZeRO stage, tensor-parallel size, world size and device, in fp32 and rounded to bf16 alike.

    transformers draws a fresh model from the global RNG in an order that depends on how it was
    built: under ``zero.Init`` (a stage-3 student) it initialises gathered parameters module by
    module; on the host (stages 1 and 2) it draws them in another order. So the same seed gave two
    different students. Here every module with parameters of its own is drawn again by the model's
    own ``_init_weights`` (HF's normal(0, initializer_range) matrices, unit norms, zero padding
    rows), into fp32 host tensors, under a generator seeded from ``seed`` and the module's index.
    Collective under ZeRO-3: each module's parameters are gathered, and rank 0's values (equal on
    every rank) are what each rank keeps of its partition. A parameter shared by two modules (tied
    embeddings) keeps its first draw.
    """
    import deepspeed

    drawn = set()
    for index, module in enumerate(model.modules()):
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            saved = [(param.data, getattr(param, "_is_hf_initialized", False)) for param in params]
            for param in params:
                # transformers' init functions skip tensors flagged as initialised (loaded or tied).
                param.data = torch.empty(param.shape, dtype=torch.float32, device="cpu")
                param._is_hf_initialized = False
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + index)
                model._init_weights(module)
            for param, (data, flag) in zip(params, saved):
                drawn_values = param.data
                param.data, param._is_hf_initialized = data, flag
                if id(param) not in drawn:
                    with torch.no_grad():
                        param.data.copy_(drawn_values)  # host fp32 -> the parameter's device and dtype
                    drawn.add(id(param))


def _build_model(section, key: str, vocab_size: int, zero_only: Optional[dict], dtype, tp: int, frozen: bool,
                 seed: int):
    """The model of ``section``, aligned to ``vocab_size`` rows; ZeRO-3 partitioned as it loads
    (``zero.Init`` with ``zero_only``), or whole on the host where ``zero_only`` is None (a
    resident teacher: ``deepspeed.initialize`` then keeps only this rank's AutoTP shard and moves
    just that to the accelerator)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    config = load_model_config(section, key)
    # Import the model's code (and, through it, torch._dynamo) before zero.Init patches
    # torch.Tensor.__new__: dynamo checks that signature when it is first imported.
    import torch._dynamo  # noqa: F401
    if not section.trust_remote_code:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with deepspeed.zero.Init(config_dict_or_path=zero_only) if zero_only is not None else contextlib.nullcontext():
        attention = None if section.attn_implementation == "auto" else section.attn_implementation
        if section.path:
            model = AutoModelForCausalLM.from_pretrained(section.path, config=config, dtype=dtype,
                                                         trust_remote_code=section.trust_remote_code,
                                                         revision=section.revision, attn_implementation=attention)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=section.trust_remote_code,
                                                     attn_implementation=attention)
    if not section.path:
        _draw_fresh_weights(model, seed)
    embedding = model.get_input_embeddings().weight
    rows = getattr(embedding, "ds_shape", embedding.shape)[0]
    if rows != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        _init_added_rows(model, rows, seed)
    if unties_head(model, tp):
        untie_head(model, zero_only)
    if frozen:
        model.requires_grad_(False)
        model.eval()
    return model


def build_teacher(source: TeacherConfig, *, vocab_size: int, ds_configs: DeepSpeedConfigs, dtype, tensor_parallel: int,
                  seed: int):
    """The frozen teacher's engine, placed as ``ds_configs.teacher`` says (``parallel.teacher_placement``).

    Resident (ZeRO stage 0): built outside ``HfDeepSpeedConfig`` and ``zero.Init``, whole on the host
    (host memory: one copy of the teacher per rank while it loads), then ``deepspeed.initialize``
    keeps this rank's AutoTP shard and moves only that to the accelerator; its forward gathers no
    parameters. ZeRO-3: loaded partitioned, re-gathered on every forward.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    resident = ds_configs.teacher_resident
    # transformers finds the ZeRO-3 config through a weak reference to this object while it loads.
    hf_ds_config = None if resident else HfDeepSpeedConfig(ds_configs.zero_only)
    model = _build_model(source, "teacher", vocab_size, None if resident else ds_configs.zero_only, dtype,
                         tensor_parallel, frozen=True, seed=seed)
    engine, *_ = deepspeed.initialize(model=model, config=ds_configs.teacher)
    engine.eval()
    del hf_ds_config
    if resident and engine.device.type == "cpu":
        _own_storage(engine.module)
    return engine


def _own_storage(module) -> None:
    """Give every parameter and buffer its own memory. Where the host is the device, tensors
    transformers loaded straight from the checkpoint's memory-mapped file keep that whole mapping
    resident (about the full teacher's size per rank, not its shard's); on an accelerator the move
    to the device already does this."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.data = tensor.data.clone()


def use_bf16(dtype: str) -> bool:
    """``train.dtype``: ``bf16``, ``fp32``, or ``auto`` (bf16 where the GPU supports it).

    ``auto`` asks the accelerator the ranks run on, not whether CUDA is visible: gloo ranks on a
    GPU machine run on DeepSpeed's CPU accelerator (``model_parallel.devices``) and stay fp32."""
    if dtype != "auto":
        return dtype == "bf16"
    return accelerator_kind() == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def engine_sources(cfg: RunConfig) -> dict:
    """What :func:`build_engines` needs of a run config, as its keyword arguments."""
    return {"student": cfg.student, "teacher": cfg.teacher if LOSSES[cfg.loss.kind].needs_teacher else None,
            "tokenizer": cfg.tokenizer, "tensor_parallel": cfg.parallel.tensor_parallel, "seed": cfg.seed,
            "activation_checkpointing": cfg.train.activation_checkpointing, "fused_head": cfg.loss.fused_head}


def build_engines(*, student: StudentConfig, teacher: Optional[TeacherConfig], tokenizer: Optional[str],
                  tensor_parallel: int, seed: int, ds_configs: DeepSpeedConfigs, bf16: bool,
                  teacher_weights: bool = True, train_student: bool = True,
                  activation_checkpointing: bool = False, fused_head="auto") -> Engines:
    """Tokenizer, teacher and student engines, and the parallel layout they were built with.

    ``teacher=None``: no teacher (cross-entropy). ``teacher_weights=False`` (export) skips the
    teacher's weights but still aligns to its vocabulary; ``train_student=False`` (evaluation)
    builds the student frozen, without optimizer state. ``seed`` fixes a fresh student's weights.
    ``activation_checkpointing`` recomputes the student's layers in backward (non-reentrant, so it
    works with ZeRO-3's parameter hooks and AutoTP). ``fused_head``: ``loss.fused_head``
    (:func:`training.fused_head.install`; announced once on rank 0).
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    student_source, tp = student, tensor_parallel
    tokenizer, vocab_size = _shared_vocabulary(student, teacher, tokenizer, tp)
    dtype = torch.bfloat16 if bf16 else torch.float32

    teacher_source, teacher = teacher, None
    if teacher_source is not None and teacher_weights:
        teacher = build_teacher(teacher_source, vocab_size=vocab_size, ds_configs=ds_configs, dtype=dtype,
                                tensor_parallel=tp, seed=seed)
    # zero.Init only where ZeRO-3 partitions the student's weights; stages 0 to 2 load it whole.
    partitioned = not train_student or ds_configs.student_stage == 3
    # Keep a reference: transformers finds the ZeRO-3 config through a weak reference to it.
    hf_ds_config = HfDeepSpeedConfig(ds_configs.zero_only) if partitioned else None
    torch.manual_seed(seed)  # the global RNG stream depends on the seed alone (the weights: _draw_fresh_weights)
    student_model = _build_model(student_source, "student", vocab_size, ds_configs.zero_only if partitioned else None,
                                 dtype, tp, frozen=not train_student, seed=seed)
    if activation_checkpointing:
        student_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train_student:
        config, optimizer = ds_configs.student, None
        if ds_configs.student_stage == 0:  # DeepSpeed's plain optimizer neither skips NaN steps nor reports the norm
            config, optimizer = plain_data_parallel(config)
        student, *_ = deepspeed.initialize(model=student_model, config=config, optimizer=optimizer,
                                           model_parameters=[p for p in student_model.parameters() if p.requires_grad])
    else:
        student, *_ = deepspeed.initialize(model=student_model, config=ds_configs.frozen)
    del hf_ds_config

    return Engines(student=student, teacher=teacher, tokenizer=tokenizer, vocab_size=vocab_size,
                   real_vocab_size=len(tokenizer), **_parallel_layout(student, teacher, vocab_size, tp),
                   fused=install(student, teacher, fused_head))


def _shared_vocabulary(student: StudentConfig, teacher: Optional[TeacherConfig], tokenizer: Optional[str], tp: int):
    """The run's tokenizer and the one vocabulary size both heads are aligned to."""
    tokenizer = resolve_tokenizer(tokenizer, teacher.path if teacher else None, student.path)
    sizes = [load_model_config(student, "student").get_text_config().vocab_size]
    if teacher is not None:
        sizes.append(load_model_config(teacher, "teacher").get_text_config().vocab_size)
    return tokenizer, aligned_vocab_size(sizes, len(tokenizer), tp)


def _parallel_layout(student, teacher, vocab_size: int, tp: int) -> dict:
    """The :class:`Engines` fields of the layout the engines were built with: groups, device and
    this rank's vocabulary slice, checked against both heads (collective over the TP group)."""
    from deepspeed.utils import groups

    vocab_start = getattr(student.module.get_output_embeddings(), "vocab_start_index", 0)
    if teacher is not None and getattr(teacher.module.get_output_embeddings(), "vocab_start_index", 0) != vocab_start:
        raise RuntimeError("teacher and student heads hold different vocabulary slices")
    if tp > 1:
        tp_group, dp_group = groups.get_tensor_model_parallel_group(), groups.get_data_parallel_group()
    else:
        tp_group, dp_group = None, torch.distributed.group.WORLD
    device = accelerator_device()
    # AutoTP splits the aligned vocabulary evenly; one collective here checks that against the heads.
    shard = resolve_vocab_shard(vocab_size // tp, tp_group, caller="build_engines", device=device)
    if shard.start != vocab_start:
        raise RuntimeError(f"the heads hold vocabulary ids from {vocab_start}, not {shard.start} as an even split "
                           f"of {vocab_size} over {tp} tensor-parallel ranks would")
    return {"vocab_start": vocab_start, "vocab_shard": shard, "tp_group": tp_group, "dp_group": dp_group,
            "dp_rank": torch.distributed.get_rank(dp_group), "dp_size": torch.distributed.get_world_size(dp_group),
            "device": device}
