"""The DeepSpeed ops a config makes DeepSpeed JIT-build, and whether this machine can build them.

With the job's defaults nothing is built on a GPU: the optimizer is torch's AdamW
(``optimizer.params.torch_adam``). Some DeepSpeed keys ask for an op that DeepSpeed 0.19.8 compiles
on first use when it was not prebuilt (``DS_BUILD_<OP>=1 pip install deepspeed``): on the CUDA
accelerator a CUDA op needs ``nvcc`` of torch's CUDA major version (torch refuses a major mismatch
in its own builds; DeepSpeed's JIT path does not check and builds an op linked against the other
runtime), and a host-side op (CPU Adam) a C++ compiler and ninja. :func:`check_buildable` finds
each such key before any engine is built and names it in one line where the build cannot work.

Read from DeepSpeed 0.19.8 (``runtime/engine.py`` ``get_optimizer_configuration``,
``runtime/zero/partition_parameters.py`` ``CUDAQuantizer``, ``runtime/comm/coalesced_collectives.py``,
``runtime/swap_tensor/*``, ``accelerator/cuda_accelerator.py``, ``ops/op_builder/builder.py``).
"""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
from typing import NamedTuple, Optional

from training.config import ConfigError

ADAM_TYPES = ("adam", "adamw")


class OpNeed(NamedTuple):
    """One op a config asks DeepSpeed for."""

    key: str
    """The config key (dotted) and value that ask for it, as the error names it."""
    op: str
    """DeepSpeed's op name (``installed_ops`` key)."""
    build_var: str
    """The variable that prebuilds it at ``pip install deepspeed``."""
    cuda: bool
    """Compiled by nvcc (a CUDA op); else by the host C++ compiler only."""
    instead: str
    """What to do instead of building it."""


def _get(ds: dict, dotted: str, default=None):
    node = ds
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def ops_needed(ds: dict) -> list:
    """The :class:`OpNeed` of every op DeepSpeed 0.19.8 on the CUDA accelerator would JIT-build for
    the DeepSpeed config ``ds`` (at start-up, or the quantized-gradient reduction at the first step)."""
    needs = []
    offload_optimizer = _get(ds, "zero_optimization.offload_optimizer.device", "none")
    optimizer = str(_get(ds, "optimizer.type", "")).lower()
    if optimizer in ADAM_TYPES and not _get(ds, "optimizer.params.torch_adam", False):
        # engine.get_optimizer_configuration: torch_adam first, then CPU Adam under optimizer
        # offload (the CUDA accelerator borrows the CPU accelerator's C++ builder), else FusedAdam.
        if offload_optimizer in ("cpu", "nvme"):
            needs.append(OpNeed("optimizer.params.torch_adam: false (with zero_optimization.offload_optimizer)",
                                "cpu_adam", "DS_BUILD_CPU_ADAM", False,
                                "remove it (torch's AdamW then steps the offloaded states)"))
        else:
            needs.append(OpNeed("optimizer.params.torch_adam: false", "fused_adam", "DS_BUILD_FUSED_ADAM", True,
                                "remove it (torch's AdamW is used)"))
    for name in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients"):
        if _get(ds, f"zero_optimization.{name}", False):
            needs.append(OpNeed(f"zero_optimization.{name}: true", "quantizer", "DS_BUILD_QUANTIZER", True,
                                "remove it"))
    gds = bool(_get(ds, "aio.use_gds", False))
    for section in ("offload_optimizer", "offload_param"):
        if _get(ds, f"zero_optimization.{section}.device") == "nvme":
            op, var = ("gds", "DS_BUILD_GDS") if gds else ("async_io", "DS_BUILD_AIO")
            needs.append(OpNeed(f"zero_optimization.{section}.device: nvme", op, var, True,
                                "use device \"cpu\""))
    return needs


def find_nvcc() -> Optional[str]:
    """The nvcc DeepSpeed would build with, or None: ``<CUDA home>/bin/nvcc``, the CUDA home found
    as torch finds it (``CUDA_HOME``, ``CUDA_PATH``, the ``nvcc`` on ``PATH``, ``/usr/local/cuda``)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        on_path = shutil.which("nvcc")
        if on_path is not None:
            home = os.path.dirname(os.path.dirname(on_path))
        elif os.path.exists("/usr/local/cuda"):
            home = "/usr/local/cuda"
    if home is None:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    return nvcc if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None


def nvcc_version(nvcc: str) -> Optional[tuple]:
    """``(major, minor)`` from ``nvcc -V`` ("... release 12.4, V12.4.131"), or None if it does not run."""
    try:
        output = subprocess.run([nvcc, "-V"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def prebuilt_ops() -> set:
    """The ops this DeepSpeed install was built with for the CUDA accelerator (``DS_BUILD_*``):
    ``installed_ops`` of ``deepspeed/git_version_info_installed.py``, the file DeepSpeed's loader
    reads. Read as data, so DeepSpeed is not imported (that would fix its accelerator)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return set()
    return _installed_cuda_ops(os.path.join(spec.submodule_search_locations[0], "git_version_info_installed.py"))


def _installed_cuda_ops(path: str) -> set:
    try:
        with open(path) as handle:
            tree = ast.parse(handle.read())
    except (OSError, SyntaxError):
        return set()  # an uninstalled checkout: nothing is prebuilt
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    # builder.load(): a prebuilt op is used only when it was built for the running accelerator.
    if values.get("accelerator_name") != "cuda":
        return set()
    return {op for op, built in values.get("installed_ops", {}).items() if built}


def _cxx_problem() -> Optional[str]:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}, from CXX or the default) is on PATH"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH"
    return None


def _nvcc_problem(torch_cuda: str) -> Optional[str]:
    nvcc = find_nvcc()
    if nvcc is None:
        return "no nvcc was found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)"
    version = nvcc_version(nvcc)
    if version is None:
        return f"{nvcc} -V does not run or name a release"
    torch_major = int(torch_cuda.split(".")[0])
    if version[0] != torch_major and os.environ.get("DS_SKIP_CUDA_CHECK", "0") != "1":
        return f"{nvcc} is CUDA {version[0]}.{version[1]} but torch is built for CUDA {torch_cuda}"
    return None


def check_buildable(ds: dict, source: str) -> None:
    """Raise :class:`ConfigError` naming the first key of ``ds`` (from ``source``) whose op is not
    prebuilt and cannot be built here. Applies on the CUDA accelerator only (on the CPU accelerator
    the job's configs build nothing but DeepSpeed's shm comm op, C++)."""
    import torch

    from model_parallel.devices import accelerator_kind

    if accelerator_kind() != "cuda" or torch.version.cuda is None:
        return
    needs = ops_needed(ds)
    prebuilt = prebuilt_ops() if needs else set()
    for need in needs:
        if need.op in prebuilt:
            continue
        problem = _nvcc_problem(torch.version.cuda) if need.cuda else _cxx_problem()
        if problem:
            kind, toolchain = ("CUDA", f"the CUDA {torch.version.cuda.split('.')[0]}.x toolkit (CUDA_HOME)") \
                if need.cuda else ("C++", "g++ and ninja")
            raise ConfigError(f"{source}: {need.key} makes DeepSpeed JIT-build its {need.op} {kind} op, and "
                              f"{problem}; {need.instead}, install DeepSpeed with {need.build_var}=1 (prebuilt "
                              f"ops) or install {toolchain}")

