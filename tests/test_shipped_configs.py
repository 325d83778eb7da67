"""Every run config we ship starts: 2 steps on 4 gloo ranks as 2 simulated nodes, through two copies of
``launch/distill.sh``'s own command line, with its DeepSpeed JSON unchanged. Only what cannot run
here is overridden: model paths (tiny local models of the same architecture), tokenizer and data
paths, the tensor-parallel size, the sequence length (through the data), steps and batch sizes.
``launch/slurm.sbatch`` runs itself, under stand-in ``srun``/``scontrol`` (``tests/slurm_standins.py``)
that start two nodes on this machine, each with its own TMPDIR; its dry run is checked too.
"""

import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys

import pytest
import yaml

from data.prepare import prepare
from model_parallel.spawn import free_port
from tests.nodes import run_simulated_nodes
from tests.tiny_models import gemma2, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "launch/configs/*.yaml")))
TOKENS = 512  # the test tokenizer's size; the shipped demo models have 1024 rows (the rest is padding)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir, tokenizer, demo_dir):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("shipped")
    for split in ("train", "eval"):
        prepare(str(tokenizer_dir), [str(demo_dir / f"pretrain/{split}.txt")], str(root / split), fmt="text",
                seq_len=32)
        # Word problems with their prompts masked, for the SFT configs.
        prepare(str(tokenizer_dir), [str(demo_dir / f"sft/{split}.jsonl")], str(root / f"sft-{split}"), fmt="sft",
                seq_len=64)
    # Gemma-2 as in the paper's pair: tied, soft-capped, GQA (4 heads, 2 KV heads), sliding window 8 < 32.
    gemma_student = root / "gemma2_student.json"
    gemma2(TOKENS, hidden=64, layers=2, heads=4, kv_heads=2, sliding_window=8).to_json_file(str(gemma_student))
    demo_teacher = AutoConfig.from_pretrained(os.path.join(ROOT, "launch/configs/models/demo_teacher.json"))
    demo_student = AutoConfig.from_pretrained(os.path.join(ROOT, "launch/configs/models/demo_student.json"))
    return {
        "root": root, "train": str(root / "train"), "eval": str(root / "eval"),
        "sft-train": str(root / "sft-train"), "sft-eval": str(root / "sft-eval"),
        # A pretrained student for the configs that start from one (student.path).
        "demo_student": save_model(demo_student, root / "demo_student", tokenizer),
        # The demo teacher's own architecture (what demo_teacher.yaml trains), randomly initialised.
        "demo_teacher": save_model(demo_teacher, root / "demo_teacher", tokenizer),
        "gemma2_teacher": save_model(gemma2(TOKENS, hidden=96, layers=2, heads=4, kv_heads=2, sliding_window=8),
                                     root / "gemma2_teacher", tokenizer),
        "gemma2_student": str(gemma_student),
    }


def _overrides(name, shipped, assets, tokenizer_dir):
    out = assets["root"] / name
    overrides = {"output_dir": str(out), "tokenizer": str(tokenizer_dir), "data.train": assets["train"],
                 "data.eval": assets["eval"], "parallel.tensor_parallel": 2, "train.max_steps": 2,
                 "train.warmup_steps": 1, "train.micro_batch_size": 2, "train.grad_accum": 1,
                 "eval.max_batches": 1, "eval.every": 0, "logging.every": 1}
    if "teacher" in shipped:
        # The paper's teacher is a Gemma-2; the demo's is the model demo_teacher.yaml trains.
        overrides["teacher.path"] = assets["gemma2_teacher" if "gemma-2" in shipped["teacher"]["path"] else "demo_teacher"]
    if shipped["student"].get("config", "").endswith("gemma2_1b.json"):
        overrides["student.config"] = assets["gemma2_student"]
    if shipped["student"].get("path"):
        # A config that starts from a trained model gets one of its architecture.
        teacher_like = shipped["student"]["path"].rstrip("/").endswith("teacher/student")
        overrides["student.path"] = assets["demo_teacher" if teacher_like else "demo_student"]
    if "sft" in shipped["data"]["train"]:
        overrides["data.train"], overrides["data.eval"] = assets["sft-train"], assets["sft-eval"]
    return overrides, str(out)


def _two_nodes(config, overrides):
    """Two copies of launch/distill.sh (NO_SSH, NODE_RANK 0 and 1), 2 processes each, as SLURM runs it."""
    hostfile = os.path.join(os.path.dirname(overrides["output_dir"]), "hostfile")
    with open(hostfile, "w") as out:
        out.write("node-a slots=2\nnode-b slots=2\n")
    args = ["--config", config] + [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "NNODES": "2", "GPUS_PER_NODE": "2",
           "HOSTFILE": hostfile, "NO_SSH": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    run_simulated_nodes(lambda rank: subprocess.run(["bash", "launch/distill.sh", *args], cwd=ROOT,
                                                    env={**env, "NODE_RANK": str(rank)}, capture_output=True,
                                                    text=True, timeout=600))


@pytest.mark.e2e
@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_starts_on_two_simulated_nodes(config, assets, tokenizer_dir):
    from transformers import AutoConfig

    shipped = yaml.safe_load(open(os.path.join(ROOT, config)))
    overrides, out = _overrides(os.path.basename(config).removesuffix(".yaml"), shipped, assets, tokenizer_dir)
    _two_nodes(config, overrides)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = {record["step"]: record["loss"] for record in records}
    assert sorted(losses) == [1, 2] and all(math.isfinite(value) for value in losses.values())
    if shipped["loss"]["kind"] == "ce":
        # Freshly initialised (std 0.02): nearly uniform over the 512 real tokens (padding is masked).
        assert losses[1] == pytest.approx(math.log(TOKENS), rel=0.02)
    # Everything else is the shipped config, DeepSpeed JSON included.
    written = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    for section, values in shipped.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            dotted = f"{section}.{key}" if key else section
            if dotted == "parallel.student_zero_stage" and value == "auto":
                assert written[section][key] in (0, 1, 2, 3), dotted  # the stage the job resolved it to
            elif dotted not in overrides:
                assert (written[section][key] if key else written[section]) == value, dotted
    exported = AutoConfig.from_pretrained(os.path.join(out, "student"))
    assert exported.model_type == ("gemma2" if "gemma2" in config else "llama")


def _slurm_env(tmp_path, **extra):
    """The environment of a batch step on the first of two nodes, with stand-in ``scontrol`` and
    ``srun`` (``tests/slurm_standins.py``) first on PATH."""
    from tests import slurm_standins

    bin_dir = slurm_standins.install(tmp_path / "bin")
    return {**os.environ, "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": ROOT,
            "PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
            **extra}


def test_slurm_dry_run_prints_the_per_node_command(tmp_path):
    env = _slurm_env(tmp_path, DRY_RUN="1", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="32",
                     STANDIN_HOSTS="gpu-a gpu-b")
    result = subprocess.run(["bash", "launch/slurm.sbatch", "--config", "launch/configs/gemma2_9b_to_1b.yaml",
                             "--set", "train.stop_at_step=100"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    environment, *hosts, command = result.stdout.strip().splitlines()
    assert environment == (f"NNODES=2 GPUS_PER_NODE=8 NO_SSH=1 MASTER_ADDR=gpu-a MASTER_PORT=29500 "
                           f"HOSTFILE={ROOT}/logs/hostfile-77")
    assert hosts == ["hostfile: gpu-a slots=8", "hostfile: gpu-b slots=8"]
    assert shlex.split(command) == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c",
                                    'NODE_RANK=$SLURM_NODEID exec bash launch/distill.sh "$@"', "_", "--config",
                                    "launch/configs/gemma2_9b_to_1b.yaml", "--set", "train.stop_at_step=100"]
    assert not os.path.exists(os.path.join(ROOT, "logs/hostfile-77"))  # a dry run writes nothing


def test_logs_directory_ships_for_slurm_output():
    """SLURM opens ``--output=logs/...`` before the script runs: the directory must be in the clone."""
    assert os.path.isfile(os.path.join(ROOT, "logs/.gitkeep"))
    header = [line for line in open(os.path.join(ROOT, "launch/slurm.sbatch")) if line.startswith("#SBATCH --output")]
    assert header == ["#SBATCH --output=logs/%x-%j.out\n"]
    ignored = open(os.path.join(ROOT, ".gitignore")).read().split()
    assert "logs/*" in ignored and "!logs/.gitkeep" in ignored


@pytest.mark.e2e
def test_slurm_batch_script_starts_both_nodes(assets, tokenizer_dir, tmp_path):
    """launch/slurm.sbatch itself (not its dry run) under stand-in ``scontrol``/``srun``: two "nodes"
    on this machine, one launcher and one rank each, each node with its own TMPDIR; the stand-in srun
    fails if anything it hands a node names a path under the batch step's TMPDIR (a file there
    exists on the first node only)."""
    import hashlib

    # launch/env.sh (which the batch script sources) must find this venv current, or it would install.
    wanted = hashlib.sha256(open(os.path.join(ROOT, "requirements.txt"), "rb").read()).hexdigest()
    marker = os.path.join(sys.prefix, ".requirements.sha256")
    if not os.path.exists(marker) or open(marker).read().strip() != wanted:
        pytest.skip(f"{sys.prefix} is not a venv launch/env.sh made from this requirements.txt (run tests/run.sh)")
    config = "launch/configs/demo_distill.yaml"
    overrides, out = _overrides("slurm_demo_distill", yaml.safe_load(open(os.path.join(ROOT, config))), assets,
                                tokenizer_dir)
    batch_tmp, node_logs = tmp_path / "batch-tmp", tmp_path / "nodes"
    batch_tmp.mkdir()
    job_id = f"test{os.getpid()}"
    hostfile = os.path.join(ROOT, "logs", f"hostfile-{job_id}")
    env = _slurm_env(tmp_path, SLURM_JOB_ID=job_id, SLURM_GPUS_ON_NODE="1", TMPDIR=str(batch_tmp),
                     STANDIN_HOSTS="127.0.0.1 localhost", STANDIN_NODE_LOGS=str(node_logs),
                     MASTER_PORT=str(free_port()), PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
                     # launch/env.sh checks the venv this test runs in and installs nothing.
                     VENV=sys.prefix)
    args = ["--config", config] + [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    def node_logs_text():
        return {rank: (node_logs / f"node{rank}.log").read_text() for rank in (0, 1)
                if (node_logs / f"node{rank}.log").exists()}

    try:
        # SLURM runs a spooled copy of the script: only SLURM_SUBMIT_DIR says where the repository is.
        try:
            result = subprocess.run(["bash", os.path.join(ROOT, "launch/slurm.sbatch"), *args], cwd=tmp_path,
                                    env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            for pgid in node_logs.glob("node*.pgid"):
                try:
                    os.killpg(int(pgid.read_text()), signal.SIGKILL)  # the nodes' launchers and ranks
                except ProcessLookupError:
                    pass
            pytest.fail("the batch script did not finish in 600 s; node logs:\n" + "\n".join(
                f"node {rank}: {text[-3000:]}" for rank, text in node_logs_text().items()))
        logs = node_logs_text()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + "".join(
            f"\nnode {rank}: {text[-3000:]}" for rank, text in logs.items())
        assert open(hostfile).read() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    finally:
        if os.path.exists(hostfile):
            os.remove(hostfile)
    assert "Installing requirements" not in result.stdout
    for rank in (0, 1):
        # Each node's own launcher, one local rank, its node rank in a world of 2.
        assert f"--node_rank={rank}" in logs[rank] and "dist_world_size=2" in logs[rank], logs[rank][-2000:]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = {record["step"]: record["loss"] for record in records if "loss" in record}
    assert sorted(losses) == [1, 2] and all(math.isfinite(value) for value in losses.values())
    # The final checkpoint holds a model-state file from each tensor-parallel rank (one a node), so
    # each node finished step 2 (ZeRO-3 names them zero_pp_rank_0_mp_rank_XX, stages 0-2 mp_rank_XX;
    # the config's student_zero_stage is auto).
    tag = os.path.join(out, "checkpoints", "step_2")
    assert sorted(name.removeprefix("zero_pp_rank_0_") for name in os.listdir(tag)
                  if name.endswith("model_states.pt")) == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]


@pytest.mark.parametrize("name, parameters", [("gemma2_9b", 9_241_705_984), ("gemma2_1b", None)])
def test_shipped_architectures_build_on_the_meta_device(name, parameters):
    """The model configs the planner and gpu_check use load offline and have their published size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.path.join(ROOT, f"launch/configs/models/{name}.json"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    if parameters:
        assert count == parameters  # google/gemma-2-9b's published parameter count
    else:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
        assert 1.0e9 < count < 1.1e9  # the ~1B student of the header, tied
