"""The one-device discipline and bf16, checked on CPU (DESIGN.md §6).

On a GPU a tensor made on the host and handed to NCCL fails; here it would pass unnoticed. So:
- a static check: every tensor constructor in the library names its device;
- one bf16 training step and one evaluation on 2 gloo ranks (TP 2) under
  :func:`model_parallel.testing.device_check.one_device`, where library tensors made without a
  device land on ``meta`` and every collective checks its tensors' device (object collectives are
  refused);
- the same run checks that the engines really are bf16, that ZeRO accumulates gradients over
  micro-batches in an fp32 buffer, and that the rows ``resize_token_embeddings`` added are
  bitwise equal on every rank;
- where CUDA is present (``benchmarks/gpu_check.sh``), the same on one CUDA rank (NCCL, TP 1).
"""

import ast
import os

import pytest
import torch
import yaml

from data.prepare import prepare
from model_parallel.testing.device_check import LIBRARY, ROOT
from model_parallel.spawn import run_on_ranks
from tests.tiny_models import llama, save_model

STUDENT_ROWS, TEACHER_ROWS = 512, 520  # the student's embedding is resized to the teacher's padded rows


def _constructors():
    from torch.utils._device import _device_constructors

    return {function.__name__ for function in _device_constructors()}


def _constructors_without_device(path):
    """``(line, name)`` of each ``torch.<constructor>(...)`` call in ``path`` with no ``device=``."""
    names = _constructors()
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(keyword.arg == "device" for keyword in node.keywords)):
            yield node.lineno, node.func.attr


def test_every_tensor_constructor_in_the_library_names_its_device():
    offenders = []
    for package in LIBRARY:
        for directory, _, files in os.walk(package):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    offenders += [f"{os.path.relpath(path, ROOT)}:{line} torch.{call}"
                                  for line, call in _constructors_without_device(path)]
    assert not offenders, "tensor constructors without device=: " + ", ".join(offenders)


def test_the_static_check_sees_a_constructor_without_device(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("import torch\na = torch.zeros(3, device=x.device)\nb = torch.tensor([1.0])\n")
    assert list(_constructors_without_device(str(source))) == [(3, "tensor")]


def _rank(rank, world_size, config_path):
    """Runs on each of 2 ranks: the guard's own behaviour, then a bf16 step and an evaluation under it."""
    import deepspeed
    import torch.distributed as dist

    from data.loader import Collator, eval_batches, load_prepared
    from model_parallel import all_reduce_sum
    from model_parallel.testing.device_check import DeviceDisciplineError, one_device
    from training.config import load_config
    from training.deepspeed_config import build_deepspeed_configs
    from training.engines import build_engines, engine_sources
    from training.step import evaluate, step_means, train_step

    out = {}
    with one_device("cpu"):
        # Code in a library file that forgets device= gets a meta tensor, which the collective refuses;
        # an object collective called from the library is refused too.
        scope = {"torch": torch, "dist": dist, "world_size": world_size}
        library_file = os.path.join(ROOT, "training", "forgetful.py")
        exec(compile("made = torch.zeros(2)", library_file, "exec"), scope)
        out["forgotten_device"] = str(scope["made"].device)
        try:
            all_reduce_sum(scope["made"], dist.group.WORLD)
        except DeviceDisciplineError as error:
            out["refused_tensor"] = str(error)
        try:
            exec(compile("dist.all_gather_object([None] * world_size, 0)", library_file, "exec"), scope)
        except DeviceDisciplineError as error:
            out["refused_object"] = str(error)
        out["test_code_default"] = str(torch.zeros(1).device)  # outside the library: untouched

    cfg = load_config(config_path, [])
    engines = build_engines(**engine_sources(cfg), ds_configs=build_deepspeed_configs(cfg, world_size, bf16=True),
                            bf16=True)
    out["device"] = str(engines.device)
    student = engines.student
    out["dtypes"] = sorted({str(p.dtype) for engine in (student, engines.teacher) for p in engine.module.parameters()})
    buffer = student.optimizer.grad_partitions_flat_buffer
    seen = []
    original_step = student.step

    def step_and_record():
        # Called after each micro-batch's backward: the buffer holds the gradients accumulated so far.
        seen.append((student.is_gradient_accumulation_boundary(), str(buffer.dtype), float(buffer.abs().sum())))
        original_step()

    student.step = step_and_record
    dataset, _ = load_prepared(cfg.data.train)
    collator = Collator(engines.tokenizer.pad_token_id)
    micro_batches = [collator([dataset[i] for i in range(j, j + 2)]) for j in (0, 2)]
    with one_device(engines.device):
        result = train_step(engines, cfg.loss, micro_batches)
        out["means"] = step_means(result, engines)
        batches = eval_batches(dataset, batch_size=2, dp_size=1, dp_rank=0, collator=collator)
        out["eval"], _ = evaluate(engines, cfg.loss, (batch for _, batch in zip(range(2), batches)))
    out["accumulation"] = seen
    embedding = student.module.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([embedding]):
        out["added_rows"] = embedding.detach()[STUDENT_ROWS:].float().cpu()
    return out


@pytest.fixture(scope="module")
def bf16_assets(tmp_path_factory, tokenizer_dir, tokenizer, demo_dir):
    root = tmp_path_factory.mktemp("device")
    prepare(str(tokenizer_dir), [str(demo_dir / "pretrain/eval.txt")], str(root / "data"), fmt="text", seq_len=32)
    llama(STUDENT_ROWS, layers=1).to_json_file(str(root / "student.json"))
    teacher = save_model(llama(TEACHER_ROWS, hidden=48), root / "teacher", tokenizer)
    return root, str(tokenizer_dir), teacher


def _bf16_config(assets, tensor_parallel: int) -> str:
    root, tokenizer_dir, teacher = assets
    config = {
        "output_dir": str(root / f"run-tp{tensor_parallel}"), "seed": 5, "tokenizer": tokenizer_dir,
        "teacher": {"path": teacher},
        "student": {"config": str(root / "student.json")},
        "data": {"train": str(root / "data")},
        "loss": {"kind": "tail", "top_k": 5, "beta": 2.0, "beta_mode": "sequence"},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 1, "dtype": "bf16"},
        "parallel": {"tensor_parallel": tensor_parallel,
                     "deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json")},
    }
    path = root / f"run-tp{tensor_parallel}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def bf16_ranks(bf16_assets):
    return run_on_ranks(2, _rank, _bf16_config(bf16_assets, tensor_parallel=2), deepspeed=True, timeout=300)


@pytest.fixture(scope="module")
def cuda_rank(bf16_assets):
    """The same step and evaluation on one CUDA rank (NCCL, TP 1): what benchmarks/gpu_check.sh runs on
    a one-GPU machine, where the 2-rank run above is gloo on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (benchmarks/gpu_check.sh runs it)")
    return run_on_ranks(1, _rank, _bf16_config(bf16_assets, tensor_parallel=1), deepspeed=True, timeout=300)[0]


def test_the_guard_catches_a_forgotten_device_and_object_collectives(bf16_ranks):
    for out in bf16_ranks:
        assert out["forgotten_device"] == "meta" and out["test_code_default"] == "cpu"
        assert "all_reduce" in out["refused_tensor"] and "on meta, not on the engine's device cpu" in out["refused_tensor"]
        assert "(from model_parallel/collectives.py:" in out["refused_tensor"]  # the library line that sent it
        assert out["refused_object"].startswith("all_gather_object (from training/forgetful.py:1 <- ")


def test_a_bf16_step_and_evaluation_keep_every_tensor_on_the_device(bf16_ranks):
    for out in bf16_ranks:
        # Finite, and the same on both tensor-parallel ranks (one replicated loss).
        assert out["means"]["loss"] == out["means"]["loss"] and out["means"]["tokens"] == 2 * 2 * 31
        assert out["means"]["loss"] == bf16_ranks[0]["means"]["loss"]
        assert out["eval"]["nll"] == bf16_ranks[0]["eval"]["nll"] and 0 < out["eval"]["nll"] < 20


def test_bf16_engines_accumulate_gradients_in_fp32(bf16_ranks):
    for out in bf16_ranks:
        assert out["dtypes"] == ["torch.bfloat16"]
        first, last = out["accumulation"]
        # After the first micro-batch the fp32 buffer already holds gradients; the second is the boundary.
        assert first[:2] == (False, "torch.float32") and first[2] > 0
        assert last[:2] == (True, "torch.float32") and last[2] != first[2]


def test_rows_added_by_resizing_are_identical_on_every_rank(bf16_ranks):
    rows = [out["added_rows"] for out in bf16_ranks]
    assert rows[0].shape == (TEACHER_ROWS - STUDENT_ROWS, 32)
    assert torch.equal(rows[0], rows[1]) and rows[0].abs().sum() > 0
    # Drawn from the run's seed alone (so every tensor-parallel size gets these very values).
    generator = torch.Generator(device="cpu").manual_seed(5)
    expected = torch.empty(TEACHER_ROWS - STUDENT_ROWS, 32, device="cpu").normal_(0.0, 0.02, generator=generator)
    assert torch.equal(rows[0], expected.to(torch.bfloat16).float())


def test_one_bf16_cuda_rank_keeps_every_tensor_on_the_device(cuda_rank):
    out = cuda_rank
    assert out["device"] == "cuda:0"
    assert out["forgotten_device"] == "meta" and out["refused_object"].startswith("all_gather_object (from ")
    assert out["dtypes"] == ["torch.bfloat16"]
    assert out["means"]["tokens"] == 2 * 2 * 31 and 0 < out["means"]["loss"] < 20  # finite, and a KL-sized loss
    assert 0 < out["eval"]["nll"] < 20
    first, last = out["accumulation"]
    assert first[:2] == (False, "torch.float32") and first[2] > 0
    assert last[:2] == (True, "torch.float32") and last[2] != first[2]
    # Drawn from the run's seed alone, on the host, whatever the device (as at TP 2 on CPU).
    generator = torch.Generator(device="cpu").manual_seed(5)
    expected = torch.empty(TEACHER_ROWS - STUDENT_ROWS, 32, device="cpu").normal_(0.0, 0.02, generator=generator)
    assert torch.equal(out["added_rows"], expected.to(torch.bfloat16).float())


def test_flash_attention_gives_the_sdpa_logits():
    """student/teacher.attn_implementation flash_attention_2: only where flash-attn is installed."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed here (it needs CUDA)")
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import llama

    torch.manual_seed(0)
    config = llama(512, hidden=64)
    ids = torch.randint(4, 512, (2, 32), device="cuda")
    logits = {}
    for implementation in ("sdpa", "flash_attention_2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=implementation)
        with torch.no_grad():
            logits[implementation] = model.cuda()(input_ids=ids).logits.float()
    # bf16 kernels that tile and accumulate differently: a few bf16 roundings of the logits.
    torch.testing.assert_close(logits["flash_attention_2"], logits["sdpa"], rtol=2e-2, atol=2e-2)
