"""GPU start-up decided on CPU: which ranks bind a GPU, and that no DeepSpeed op is JIT-built.

CUDA is simulated by patching torch's queries: ``torch.cuda.is_available``, ``device_count`` and a
``set_device`` that raises "invalid device ordinal" past the count, as CUDA does; ``torch.cuda._lazy_init``
(what any CUDA context creation goes through) fails the test. DeepSpeed's CUDA accelerator is
simulated the same way (``torch.version.cuda``), with a fake ``nvcc`` under ``CUDA_HOME``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from core.errors import UserError
from model_parallel import devices
from model_parallel.devices import RankDevice, decide_rank_device, local_group_backend
from training import jit_ops
from training.config import ConfigError, load_config
from training.deepspeed_config import build_deepspeed_configs, frozen_deepspeed_configs

from tests.test_job_config import BASE as JOB_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run config of tests/test_job_config.py, on one rank and one micro-batch per step.
BASE = JOB_CONFIG.replace("grad_accum: 3", "grad_accum: 1").replace("tensor_parallel: 2", "tensor_parallel: 1")


class FakeCuda:
    """``gpus`` visible GPUs: the calls CUDA would answer, recorded."""

    def __init__(self, gpus: int):
        self.gpus, self.set_device_calls = gpus, []

    def set_device(self, ordinal):
        self.set_device_calls.append(ordinal)
        if ordinal >= self.gpus:
            raise RuntimeError("CUDA error: invalid device ordinal")

    @staticmethod
    def lazy_init():
        raise AssertionError("a CUDA context was created")

    def patches(self):
        return [(torch.cuda, "is_available", lambda: self.gpus > 0), (torch.cuda, "device_count", lambda: self.gpus),
                (torch.cuda, "set_device", self.set_device), (torch.cuda, "_lazy_init", self.lazy_init)]


def simulate_gpus(monkeypatch, gpus: int, cuda_version: str = "12.4") -> FakeCuda:
    """``gpus`` visible GPUs of a CUDA ``cuda_version`` torch build, DeepSpeed's accelerator not yet chosen."""
    fake = FakeCuda(gpus)
    for target, name, value in fake.patches():
        monkeypatch.setattr(target, name, value)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    for name in ("DS_ACCELERATOR", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CUDA_VISIBLE_DEVICES", "DS_SKIP_CUDA_CHECK"):
        monkeypatch.setenv(name, "")  # restored at teardown, also where the code sets it
        monkeypatch.delenv(name)
    chosen = sys.modules.get("deepspeed.accelerator.real_accelerator")
    if chosen is not None:  # another test of this worker imported DeepSpeed (on the CPU accelerator)
        monkeypatch.setattr(chosen, "ds_accelerator", None)
    return fake


# --- 1. ranks and devices --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus, local_rank, ranks_on_node, backend, expected", [
    (1, 1, 2, "gloo", RankDevice("gloo", "cpu", None)),     # run_on_ranks(2) on one GPU
    (8, 15, 16, "gloo", RankDevice("gloo", "cpu", None)),   # launch.export of 16 ranks on one 8-GPU node
    (8, 3, 8, None, RankDevice("nccl", "cuda", 3)),         # the job, one rank per GPU
    (1, 0, None, None, RankDevice("nccl", "cuda", 0)),
    (0, 1, 2, None, RankDevice("gloo", "cpu", None)),       # a CPU machine
])
def test_rank_device_decision(monkeypatch, gpus, local_rank, ranks_on_node, backend, expected):
    simulate_gpus(monkeypatch, gpus)
    assert decide_rank_device(local_rank, backend, ranks_on_node=ranks_on_node) == expected


def test_ds_accelerator_cpu_makes_a_gloo_rank_on_a_gpu_machine(monkeypatch):
    simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert decide_rank_device(0) == RankDevice("gloo", "cpu", None)


@pytest.mark.parametrize("gpus, local_rank, ranks_on_node, message", [
    # Every rank of the node refuses, also those with a GPU, so none waits in the rendezvous.
    (8, 15, 16, "LOCAL_RANK 15: 16 ranks run on this node but 8 GPU(s) are visible; NCCL needs one GPU per rank: "
                "start at most 8 rank(s) per node (deepspeed --num_gpus 8, torchrun --nproc_per_node 8)"),
    (8, 2, 16, "LOCAL_RANK 2: 16 ranks run on this node but 8 GPU(s) are visible"),
    (1, 1, None, "LOCAL_RANK 1: has no GPU: 1 GPU(s) are visible; NCCL needs one GPU per rank: start at most 1"),
])
def test_nccl_rank_without_a_gpu_is_refused_by_name(monkeypatch, gpus, local_rank, ranks_on_node, message):
    simulate_gpus(monkeypatch, gpus)
    with pytest.raises(UserError) as error:
        decide_rank_device(local_rank, ranks_on_node=ranks_on_node)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("gpus, world_size, deepspeed, backend", [
    (1, 2, True, "gloo"), (8, 8, True, "nccl"), (8, 16, True, "gloo"), (8, 2, False, "gloo"), (0, 2, True, "gloo")])
def test_local_launcher_backend(monkeypatch, gpus, world_size, deepspeed, backend):
    simulate_gpus(monkeypatch, gpus)
    assert local_group_backend(world_size, deepspeed=deepspeed) == backend


def test_the_job_refuses_more_ranks_than_gpus_before_touching_cuda(monkeypatch):
    """``init_distributed`` as ``launch.distill`` calls it, rank 15 of 16 on an 8-GPU node: the
    named refusal, no ``set_device`` (today's code called ``set_device(15)``: "invalid device ordinal")."""
    from model_parallel.distributed import init_distributed

    fake = simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("LOCAL_RANK", "15")
    monkeypatch.setenv("LOCAL_SIZE", "16")  # as the deepspeed launcher sets it
    with pytest.raises(UserError, match="LOCAL_RANK 15: 16 ranks run on this node but 8 GPU"):
        init_distributed(timeout_s=30)
    assert fake.set_device_calls == []


def test_an_nccl_rank_binds_its_gpu(monkeypatch):
    fake = simulate_gpus(monkeypatch, 8)
    devices.bind(decide_rank_device(5, ranks_on_node=8))
    assert fake.set_device_calls == [5] and os.environ["DS_ACCELERATOR"] == "cuda"


@pytest.mark.parametrize("accelerator, expected", [("cpu", False), ("cuda", True)])
def test_auto_dtype_follows_the_ranks_accelerator(monkeypatch, accelerator, expected):
    """``train.dtype: auto`` on a bf16-capable GPU machine: bf16 for NCCL ranks, fp32 for gloo ranks
    on DeepSpeed's CPU accelerator (before, a visible GPU made every rank bf16)."""
    from training.engines import use_bf16

    simulate_gpus(monkeypatch, 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setenv("DS_ACCELERATOR", accelerator)
    assert use_bf16("auto") is expected and use_bf16("fp32") is False and use_bf16("bf16") is True


def _rank_1_on_one_gpu(config_path: str, out_path: str) -> None:
    """Run in a fresh process: rank 1 of a 2-rank gloo group on a one-GPU machine (its group of one:
    the rendezvous needs no peer) starts through ``init_distributed`` as ``run_on_ranks`` starts it,
    then DeepSpeed builds and steps a student from the config in ``config_path``; facts to ``out_path``."""
    from model_parallel.spawn import free_port

    fake = FakeCuda(1)
    saved = [(target, name, getattr(target, name)) for target, name, _ in fake.patches()]
    for target, name, value in fake.patches():
        setattr(target, name, value)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="1", LOCAL_SIZE="2")
    os.environ.pop("DS_ACCELERATOR", None)
    from model_parallel.distributed import init_distributed

    init_distributed(backend=local_group_backend(2, deepspeed=True))
    import deepspeed
    import torch.distributed as dist

    facts = {"set_device": fake.set_device_calls, "backend": dist.get_backend(),
             "accelerator": deepspeed.accelerator.get_accelerator()._name}
    for target, name, value in saved:  # the engine below runs on the CPU accelerator as it is
        setattr(target, name, value)
    with open(config_path) as handle:
        config = json.load(handle)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.randn(2, 4)
    engine.backward(1e-2 * engine(x).sum())
    engine.step()
    optimizer = engine.basic_optimizer
    facts.update(optimizer=type(optimizer).__module__ + "." + type(optimizer).__name__,
                 fused=optimizer.defaults.get("fused"), betas=list(optimizer.defaults["betas"]),
                 exp_avg_norm=sum(state["exp_avg"].double().square().sum().item()
                                  for state in optimizer.state.values()) ** 0.5,
                 x=x.tolist())
    with open(out_path, "w") as out:
        json.dump(facts, out)
    dist.destroy_process_group()


@pytest.fixture
def base(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    path = tmp_path / "run.yaml"
    path.write_text(BASE.replace("DS", str(ds)))
    return str(path)


@pytest.mark.e2e
def test_gloo_rank_past_the_gpu_count_starts_and_trains_with_torch_adamw(monkeypatch, base, tmp_path):
    """Item 1: rank 1 on one GPU starts (gloo, CPU accelerator, no ``set_device``). Item 2: the
    student config made for a CUDA machine gives DeepSpeed 0.19.8 torch's fused AdamW (no op to
    build), which steps: the first step's Adam moment is (1 - beta1) x the gradient, whose norm is
    known in closed form for a linear layer under loss = 0.01 x sum(outputs)."""
    simulate_gpus(monkeypatch, 1)
    student = build_deepspeed_configs(load_config(base), world_size=1, bf16=False).student
    monkeypatch.undo()
    config, out = tmp_path / "student.json", tmp_path / "facts.json"
    config.write_text(json.dumps(student))
    code = f"from tests.test_gpu_startup import _rank_1_on_one_gpu; _rank_1_on_one_gpu({str(config)!r}, {str(out)!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(out.read_text())
    assert facts["set_device"] == [] and facts["backend"] == "gloo" and facts["accelerator"] == "cpu"
    assert facts["optimizer"] == "torch.optim.adamw.AdamW" and facts["fused"] is True
    x = torch.tensor(facts["x"], dtype=torch.float64)
    # d(0.01 sum(x W^T + b))/dW[i, j] = 0.01 sum_b x[b, j] for each of 3 rows; d/db[i] = 0.01 x batch
    grad_norm = 0.01 * (3 * x.sum(0).square().sum() + 3 * x.shape[0] ** 2).sqrt().item()
    assert grad_norm < 1.0  # below train.grad_clip: no clipping
    # fp32 moments of an fp32 gradient: a few ulps
    assert facts["exp_avg_norm"] == pytest.approx((1 - facts["betas"][0]) * grad_norm, rel=1e-5)


# --- 2. no JIT build at start-up ---------------------------------------------------------------------------------

def fake_nvcc(tmp_path, release: str) -> str:
    """A CUDA home whose bin/nvcc answers ``-V`` like nvcc ``release``."""
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.131'\n")
    nvcc.chmod(0o755)
    return str(home)


def ds_run(base, tmp_path, ds: dict):
    path = tmp_path / "risky.json"
    path.write_text(json.dumps(ds))
    return load_config(base, [f"parallel.deepspeed_config={path}"]), str(path)


def test_default_optimizer_on_cuda_is_torch_fused_adamw(monkeypatch, base, tmp_path):
    simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))  # no nvcc: nothing may need it
    params = build_deepspeed_configs(load_config(base), world_size=8, bf16=True).student["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    # Universal resume: DeepSpeed hands the optimizer a host `step`; torch's foreach update takes it.
    universal = build_deepspeed_configs(load_config(base), world_size=8, bf16=True, universal=True).student
    assert universal["optimizer"]["params"]["torch_adam"] is True and "fused" not in universal["optimizer"]["params"]
    cfg, _ = ds_run(base, tmp_path, {"optimizer": {"type": "AdamW", "params": {"foreach": True}}})
    assert "fused" not in build_deepspeed_configs(cfg, world_size=8, bf16=True).student["optimizer"]["params"]


def test_cpu_optimizer_and_precision_are_unchanged(base):
    for bf16 in (False, True):
        student = build_deepspeed_configs(load_config(base), world_size=2, bf16=bf16).student
        # torch's fused AdamW on CPU too: one multi-tensor call, not a Python loop of ~10 ops per tensor.
        assert student["optimizer"]["params"] == {"torch_adam": True, "lr": 0.001, "weight_decay": 0.0, "fused": True}
        assert student["bf16"] == {"enabled": bf16}
        assert student.get("data_types") == ({"grad_accum_dtype": "fp32"} if bf16 else None)


RISKY = [
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}, "optimizer.params.torch_adam: false",
     "fused_adam"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "zero_optimization.zero_quantized_weights",
     "quantizer"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}},
     "zero_optimization.zero_quantized_gradients", "quantizer"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}},
     "zero_optimization.zero_quantized_nontrainable_weights", "quantizer"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}},
     "zero_optimization.offload_param.device: nvme", "async_io"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}},
     "zero_optimization.offload_optimizer.device: nvme", "async_io"),
]


@pytest.mark.parametrize("ds, key, op", RISKY)
def test_a_key_that_needs_nvcc_is_refused_by_name(monkeypatch, base, tmp_path, ds, key, op):
    simulate_gpus(monkeypatch, 8, cuda_version="12.4")
    cfg, source = ds_run(base, tmp_path, ds)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(ConfigError) as missing:
        build_deepspeed_configs(cfg, world_size=8, bf16=True)
    assert str(missing.value).startswith(f"{source}: {key}") and f"its {op} CUDA op" in str(missing.value)
    assert "no nvcc was found" in str(missing.value) and "\n" not in str(missing.value)
    monkeypatch.setenv("CUDA_HOME", fake_nvcc(tmp_path, "11.8"))
    with pytest.raises(ConfigError, match=f"{key}.* is CUDA 11.8 but torch is built for CUDA 12.4"):
        build_deepspeed_configs(cfg, world_size=8, bf16=True)
    monkeypatch.setenv("CUDA_HOME", fake_nvcc(tmp_path, "12.6"))  # a minor difference builds
    build_deepspeed_configs(cfg, world_size=8, bf16=True)


def test_frozen_engines_are_checked_too(monkeypatch, tmp_path):
    simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}))
    with pytest.raises(ConfigError, match="zero_optimization.zero_quantized_weights: true makes DeepSpeed JIT-build"):
        frozen_deepspeed_configs(str(path), tensor_parallel=1, world_size=8, micro_batch_size=1, bf16=True)


def test_a_prebuilt_op_needs_no_nvcc(monkeypatch, base, tmp_path):
    simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    info = tmp_path / "git_version_info_installed.py"  # as DeepSpeed's setup.py writes it
    info.write_text("version='0.19.8'\ninstalled_ops={'fused_adam': True, 'quantizer': False, 'cpu_adam': True}\n"
                    "accelerator_name='cuda'\ntorch_info={'version': '2.13', 'cuda_version': '12.4'}\n")
    monkeypatch.setattr(jit_ops, "prebuilt_ops", lambda: jit_ops._installed_cuda_ops(str(info)))
    cfg, _ = ds_run(base, tmp_path, {"optimizer": {"params": {"torch_adam": False}}})
    assert build_deepspeed_configs(cfg, world_size=8, bf16=True).student["optimizer"]["params"]["torch_adam"] is False
    cfg, _ = ds_run(base, tmp_path, {"zero_optimization": {"stage": 3, "zero_quantized_weights": True}})
    with pytest.raises(ConfigError, match="its quantizer CUDA op"):
        build_deepspeed_configs(cfg, world_size=8, bf16=True)
    # Ops built for another accelerator are not used on CUDA (DeepSpeed's builder.load()).
    info.write_text(info.read_text().replace("accelerator_name='cuda'", "accelerator_name='cpu'"))
    assert jit_ops.prebuilt_ops() == set()


def test_cpu_adam_under_offload_needs_a_cxx_compiler_not_nvcc(monkeypatch, base, tmp_path):
    """On the CUDA accelerator DeepSpeed 0.19.8 builds CPU Adam with the CPU accelerator's C++
    builder; without ``torch_adam: false`` the offloaded states step with torch's AdamW (no build)."""
    simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    cfg, _ = ds_run(base, tmp_path, offload)
    assert build_deepspeed_configs(cfg, world_size=8, bf16=True).student["optimizer"]["params"]["torch_adam"] is True
    cfg, source = ds_run(base, tmp_path, {**offload, "optimizer": {"params": {"torch_adam": False}}})
    build_deepspeed_configs(cfg, world_size=8, bf16=True)  # g++ and ninja are here, nvcc is not
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ConfigError, match=r"optimizer.params.torch_adam: false \(with zero_optimization."
                                          r"offload_optimizer\) makes DeepSpeed JIT-build its cpu_adam C\+\+ op"):
        build_deepspeed_configs(cfg, world_size=8, bf16=True)


def test_other_optimizers_are_refused_whatever_the_toolchain(monkeypatch, base, tmp_path):
    """FusedLamb, the 1-bit optimizers, Lion, ...: the run config owns the optimizer (AdamW)."""
    simulate_gpus(monkeypatch, 8)
    monkeypatch.setenv("CUDA_HOME", fake_nvcc(tmp_path, "12.4"))
    for kind in ("Lamb", "OneBitAdam", "ZeroOneAdam", "OneBitLamb", "Lion", "Adagrad"):
        cfg, _ = ds_run(base, tmp_path, {"optimizer": {"type": kind}})
        with pytest.raises(ConfigError, match=f"optimizer.type is '{kind}' but the run config implies 'AdamW'"):
            build_deepspeed_configs(cfg, world_size=8, bf16=True)
