"""launch.plan / training.plan: model sizes against real models, ZeRO states against DeepSpeed's
estimator, the command's JSON and errors, and the production config's generated header."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_models import gemma2, llama
from training.config import load_config
from training.plan import Cluster, Layout, estimate, job_from_config, model_shape, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCTION = "launch/configs/gemma2_9b_to_1b.yaml"


def _plan_command(*args):
    return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("architecture, tp, untied", [(llama, 1, False), (llama, 2, False), (gemma2, 1, False),
                                                      (gemma2, 2, True)])
def test_model_shape_counts_the_parameters_the_job_holds(tmp_path, architecture, tp, untied):
    """Meta-device counts equal a real model's parameters; Gemma-2's tied scaled head is untied at TP > 1
    (one more V x H matrix), as training.engines does."""
    from transformers import AutoModelForCausalLM

    config = architecture(96)
    config.to_json_file(tmp_path / "config.json")
    model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())  # unique parameters: a tied head counts once
    shape = model_shape(str(tmp_path / "config.json"), vocab=96, tp=tp)
    assert shape.sharded + shape.replicated + shape.head == real + (96 * config.hidden_size if untied else 0)
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"))
    assert shape.sharded == linear
    assert shape.eager_attention == (architecture is gemma2)  # soft-capped attention: eager under "auto"


def test_zero3_student_states_agree_with_deepspeeds_estimator():
    """Stage 3 in bf16 with fp32 master weights, moments and gradients: 18 bytes per parameter over
    all ranks (TP 1), DeepSpeed's own estimate without offload (its largest-layer term aside), plus
    the bf16 copies of the tensors under the persistence threshold that every rank keeps whole."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = load_config(os.path.join(ROOT, PRODUCTION))
    cluster = Cluster(nodes=2, gpus_per_node=8)
    job = job_from_config(cfg, world_size=16, tp=1, bf16=True)
    states = estimate(job, Layout(1, "resident", 3, 1, 4, True), cluster).memory
    total = sum(states[t] for t in ("student_weights", "student_master", "student_optimizer", "student_gradients"))
    params = job.student.per_rank(1)
    _, gpu_bytes, largest = estimate_zero3_model_states_mem_needs(params, 1, num_gpus_per_node=8, num_nodes=2,
                                                                  cpu_offload=False)
    assert total - 2 * job.student.persistent(1e5) == pytest.approx(gpu_bytes - largest, rel=1e-6)


@pytest.mark.e2e
def test_json_names_every_term_and_layout(tmp_path):
    result = _plan_command("--config", PRODUCTION, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out["memory"]) == {"teacher_weights", "student_weights", "student_master", "student_optimizer",
                                  "student_gradients", "activations", "logits", "comm_buffers"}
    assert set(out["traffic"]) == {"teacher_gather", "student_gather", "student_reduce_scatter", "tp_allreduce",
                                   "loss_exchange"}
    assert out["peak_memory_bytes"] == pytest.approx(sum(out["memory"].values()))
    assert out["bottleneck"] in {"compute", *out["traffic"]} and out["step_time_s"] > 0
    assert out["estimate"] is True and out["assumptions"]
    # CUDA context and NCCL buffers: outside the peak, inside the GPU (1 GB + 0.3 GB per communicator).
    assert out["reserve_bytes"] >= 1.3e9
    fitting = [entry for entry in out["layouts"] if entry["fits"]]
    assert out["layout"] in [entry["layout"] for entry in fitting]
    # The fastest that fits is shown, and it is the fastest within the rounding of the tie rule.
    assert out["step_time_s"] <= min(entry["step_time_s"] for entry in fitting) + 1e-3
    for entry in out["layouts"]:
        assert set(entry) == {"layout", "peak_memory_bytes", "step_time_s", "fits", "rejected"}
        assert entry["fits"] == (entry["rejected"] is None)
    # A zero3 teacher moves its weights every micro-batch; a resident one none.
    by_layout = {json.dumps(entry["layout"], sort_keys=True): entry for entry in out["layouts"]}
    assert len(by_layout) == len(out["layouts"])
    configured = _plan_command("--config", PRODUCTION, "--json", "--as-configured")
    assert json.loads(configured.stdout)["layout"]["parallel.tensor_parallel"] == \
        load_config(os.path.join(ROOT, PRODUCTION)).parallel.tensor_parallel


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["--set", "parallel.tensor_parallel=3", "--gpus-per-node", "3", "--nodes", "1"],
     "parallel.tensor_parallel 3 does not divide the teacher's 16 attention heads"),
    (["--gpus-per-node", "4", "--set", "parallel.tensor_parallel=8"],
     "parallel.tensor_parallel 8 must divide the 4 GPUs of a node"),
    (["--gpus-per-node", "0"], "--gpus-per-node: must be > 0"),
    (["--nodes", "2", "--gpus-per-node", "8", "--gpus", "12"],
     "--gpus 12 does not match --nodes 2 x --gpus-per-node 8 = 16"),
])
def test_bad_input_is_one_line_naming_the_key(args, message):
    result = _plan_command("--config", PRODUCTION, *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr


@pytest.mark.e2e
def test_a_job_that_fits_nowhere_names_the_smallest_cluster_that_would():
    # 10 GB GPUs: one node is too small, and more nodes help (at 8 GB the zero3 teacher's gathered
    # layers outgrow what more data-parallel ranks save, and no cluster of up to 64 nodes fits).
    result = _plan_command("--config", PRODUCTION, "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "10")
    assert result.returncode == 1 and "WARNING: this layout will not fit" in result.stdout
    line = next(line for line in result.stdout.splitlines() if "no layout fits on this cluster" in line)
    nodes = int(line.split("the smallest that would: ")[1].split(" node")[0])
    cfg = load_config(os.path.join(ROOT, PRODUCTION))
    small = Cluster(nodes=nodes - 1, gpus_per_node=8, gpu_memory_gb=10)
    assert plan(cfg, small).chosen is None and plan(cfg, Cluster(nodes=nodes, gpus_per_node=8, gpu_memory_gb=10)).chosen


def test_a_zero3_teacher_trades_memory_for_traffic():
    cfg = load_config(os.path.join(ROOT, PRODUCTION))
    job = job_from_config(cfg, world_size=16, tp=8, bf16=True)
    cluster = Cluster()
    resident, zero3 = (estimate(job, Layout(8, placement, 3, 4, 8, False), cluster)
                       for placement in ("resident", "zero3"))
    assert resident.traffic["teacher_gather"] == 0 and zero3.traffic["teacher_gather"] > 0
    # Partitioned over the 2 data-parallel ranks, but for the small tensors every rank keeps whole.
    assert zero3.memory["teacher_weights"] == pytest.approx(resident.memory["teacher_weights"] / 2 +
                                                            2 * job.teacher.persistent(1e5))


def test_stage_0_is_planned_only_where_it_runs_and_holds_whole_states():
    """Stage 0 (plain data parallelism) is a candidate for an fp32 job at TP 1 only; against stage 1
    it holds every Adam state on each rank, no fp32 master copy, and moves no parameter all-gather."""
    cfg = load_config(os.path.join(ROOT, PRODUCTION))
    cluster = Cluster(nodes=2, gpus_per_node=8)
    for bf16 in (True, False):
        estimates = plan(cfg, cluster, bf16=bf16).estimates
        stage_0 = {e.layout.tensor_parallel for e in estimates if e.layout.student_zero_stage == 0}
        assert stage_0 == (set() if bf16 else {1})
    job = job_from_config(cfg, world_size=16, tp=1, bf16=False)
    zero_0, zero_1 = (estimate(job, Layout(1, "resident", stage, 1, 4, True), cluster) for stage in (0, 1))
    params = job.student.per_rank(1)
    assert zero_0.memory["student_optimizer"] == 16 * zero_1.memory["student_optimizer"] == 8 * params
    assert zero_0.memory["student_master"] == 0 and zero_1.memory["student_master"] == 4 * params / 16
    assert zero_0.traffic["student_gather"] == 0 and zero_1.traffic["student_gather"] == 4 * params / 16
    assert zero_0.traffic["student_reduce_scatter"] == zero_1.traffic["student_reduce_scatter"] == 4 * params


@pytest.mark.e2e
def test_the_production_header_is_the_planners():
    """launch/configs/gemma2_9b_to_1b.yaml opens with what the planner prints for it (regenerate with
    the command on its second line), and its layout is the one the plan recommends."""
    with open(os.path.join(ROOT, PRODUCTION)) as handle:
        text = handle.read()
    shipped = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    command = shipped.splitlines()[1].removeprefix("#   python -m launch.plan ").split()
    regenerated = _plan_command(*command)
    assert regenerated.returncode == 0, regenerated.stderr
    assert shipped.startswith(regenerated.stdout)
    recommended = plan(load_config(os.path.join(ROOT, PRODUCTION)), Cluster()).chosen.layout
    configured = json.loads(_plan_command("--config", PRODUCTION, "--json", "--as-configured").stdout)
    assert configured["layout"] == recommended.as_config()
    # At least 10% of the 80 GB left free by the planned peak, the CUDA context and NCCL's buffers.
    assert configured["peak_memory_bytes"] + configured["reserve_bytes"] <= 0.9 * 80e9


def test_the_production_deepspeed_json_has_the_plans_settings():
    """Bucket sizes, persistence and the accumulation dtype of the shipped 9B -> 1B job are the plan's
    (training.plan.deepspeed_settings), as the job completes its DeepSpeed config."""
    from training.deepspeed_config import build_deepspeed_configs

    cfg = load_config(os.path.join(ROOT, PRODUCTION))
    chosen = plan(cfg, Cluster())
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        student = build_deepspeed_configs(cfg, world_size=16, bf16=True).student
    finally:
        os.chdir(cwd)
    assert chosen.deepspeed and chosen.shown is chosen.chosen
    for dotted, value in chosen.deepspeed.items():
        section, key = dotted.split(".")
        assert student[section][key] == value, dotted
