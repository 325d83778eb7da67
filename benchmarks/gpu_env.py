"""What ``benchmarks/gpu_check.sh`` runs with, and whether it can run on a GPU at all.

    python benchmarks/gpu_env.py

Prints one line each: python, torch and the CUDA it was built for, deepspeed, transformers, the
other packages the job imports, nvcc (if any; nothing needs it: no op is built at start-up) and the
GPUs with their driver. Exit 0 when every package is installed, torch is a CUDA build and a CUDA device
is visible; otherwise exit 2 after saying, in one line each, what to install or what is missing.
The versions the project pins are read from requirements.txt.
"""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (import name, requirements.txt name) of what the check and the job import besides torch.
PACKAGES = [("deepspeed", "deepspeed"), ("transformers", "transformers"), ("datasets", "datasets"),
            ("tokenizers", "tokenizers"), ("yaml", "pyyaml"), ("psutil", "psutil"), ("tqdm", "tqdm"),
            ("tensorboard", "tensorboard"), ("pytest", "pytest")]


def pinned_versions(path: str = os.path.join(ROOT, "requirements.txt")) -> dict:
    """``{name: version}`` of the ``name==version`` lines of requirements.txt."""
    pins = {}
    for line in open(path):
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def cuda_build_problem(torch_version: str, cuda_version, pinned_torch: str):
    """The line that says what to install when torch is not a CUDA build, or None when it is."""
    if cuda_version:
        return None
    return (f"error: torch {torch_version} in {sys.executable} is a CPU build (torch.version.cuda is None), so "
            f"no GPU can be used: install the CUDA wheel of torch {pinned_torch} from PyTorch's index (pip install "
            f"torch=={pinned_torch} --index-url <PyTorch's wheel index for cu12x>, choosing a CUDA version not newer "
            f"than the driver's, which nvidia-smi's header shows), then run this check again")


def nvcc_note(release: str, torch_cuda) -> str:
    """What nvcc's release means here: nothing is built at start-up, but a config that asks for a
    JIT-built op needs nvcc of torch's CUDA major version."""
    match = re.search(r"release (\d+)\.(\d+)", release)
    if not match:
        return "none: not needed unless a config asks for a JIT-built DeepSpeed op"
    if torch_cuda and match.group(1) != torch_cuda.split(".")[0]:
        return (f"CUDA {match.group(1)}.{match.group(2)}, torch's is {torch_cuda}: not needed, but a config that asks "
                f"for a JIT-built DeepSpeed op would be refused")
    return "not needed: no op is built at start-up"


def _command_line(argv) -> str:
    """The first line of ``argv``'s output, or why there is none."""
    if shutil.which(argv[0]) is None:
        return "not found on PATH"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"failed ({error})"
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return "; ".join(lines) if result.returncode == 0 and lines else f"failed (exit {result.returncode})"


def main() -> int:
    problems = []
    pins = pinned_versions()
    print(f"python:       {sys.version.split()[0]} ({sys.executable})")
    try:
        import torch
    except ImportError:
        print("torch:        not installed")
        print(f"error: torch is not importable in {sys.executable}: install the CUDA wheel of torch "
              f"{pins.get('torch', '')} from PyTorch's index, then the rest of requirements.txt", file=sys.stderr)
        return 2
    print(f"torch:        {torch.__version__} (built for CUDA {torch.version.cuda}; pinned {pins.get('torch')})")
    problem = cuda_build_problem(torch.__version__, torch.version.cuda, pins.get("torch", torch.__version__))
    if problem:
        problems.append(problem)
    for module, requirement in PACKAGES:
        # Found and its installed version read without importing it (deepspeed alone takes seconds);
        # a broken install shows in section 1.
        if importlib.util.find_spec(module) is not None:
            try:
                version = importlib.metadata.version(requirement)
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            print(f"{module + ':':<13} {version} (pinned {pins.get(requirement, '-')})")
        else:
            print(f"{module + ':':<13} not installed")
            pin = f"=={pins[requirement]}" if requirement in pins else ""
            problems.append(f"error: {module} is not installed in {sys.executable}: pip install {requirement}{pin} "
                            f"(without a network, from a wheel brought to the machine)")
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else "nvcc")
    release = _command_line([nvcc, "--version"])
    print(f"nvcc:         {release.split('; ')[-2] if release.count('; ') >= 2 else release} "
          f"({nvcc_note(release, torch.version.cuda)})")
    gpus = _command_line(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if gpus == "not found on PATH" and os.path.exists("/proc/driver/nvidia/version"):
        gpus = f"nvidia-smi not on PATH; {open('/proc/driver/nvidia/version').readline().strip()}"
    print(f"gpus/driver:  {gpus}")
    if not problem:
        count = torch.cuda.device_count()
        print(f"cuda devices: {count}" + (f" ({torch.cuda.get_device_name(0)}, compute capability "
                                          f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}, "
                                          f"bf16 {torch.cuda.is_bf16_supported()})" if count else ""))
        if count == 0:
            problems.append("error: torch is a CUDA build but sees no CUDA device (torch.cuda.device_count() is 0; "
                            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    for line in problems:
        print(line, file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
