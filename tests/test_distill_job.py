"""End-to-end runs of launch.distill under the deepspeed launcher (CPU, gloo, tiny models).

Runs are shared between tests (module fixtures) because each costs 15-40 s on this machine.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from data.prepare import prepare
from eval.evaluate import TAIL_METRICS
from model_parallel.spawn import free_port
from tests.fault_driver import FaultDriver, faults_dir
from tests.nodes import run_simulated_nodes
from tests.tiny_models import gemma2, llama, save_model

pytestmark = pytest.mark.e2e  # every test here launches the job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
STEPS = 8
# bf16 keeps 8 mantissa bits: unit roundoff 2**-9 = 2.0e-3 per logit and weight. Measured here: the
# 8 losses differ from fp32 by at most 9.3e-4 relative. 5e-3 (2.5 roundoffs, 5x the measurement)
# leaves room for other BLAS orderings, and still catches a loss computed in bf16 or lost casts.
BF16_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir, tokenizer, demo_dir):
    root = tmp_path_factory.mktemp("job")
    prepare(str(tokenizer_dir), [str(demo_dir / "pretrain/train.txt")], str(root / "train"), fmt="text", seq_len=32)
    prepare(str(tokenizer_dir), [str(demo_dir / "pretrain/eval.txt")], str(root / "eval"), fmt="text", seq_len=32)
    student_config = root / "student.json"
    llama(512, hidden=32, layers=1).to_json_file(str(student_config))
    gemma_student = root / "gemma_student.json"
    gemma2(512, layers=1).to_json_file(str(gemma_student))
    return {
        "root": root,
        "tokenizer": str(tokenizer_dir),
        "teacher": save_model(llama(512, hidden=48), root / "teacher", tokenizer),
        # A padded vocabulary (520 rows for 512 tokens) and Gemma-2's tied, scaled, soft-capped head.
        "gemma_teacher": save_model(gemma2(520, hidden=48), root / "gemma_teacher", tokenizer),
        # A teacher padded to 520 rows: the untied 512-row student gets 8 rows added by resizing.
        "padded_teacher": save_model(llama(520, hidden=48), root / "padded_teacher", tokenizer),
        "student_config": str(student_config),
        "gemma_student_config": str(gemma_student),
        "train": str(root / "train"),
        "eval": str(root / "eval"),
    }


def _config(assets, name, **sections):
    config = {
        "output_dir": str(assets["root"] / name),
        "seed": 5,
        "tokenizer": assets["tokenizer"],
        "teacher": {"path": assets["teacher"]},
        "student": {"config": assets["student_config"]},
        "data": {"train": assets["train"], "eval": assets["eval"]},
        "loss": {"kind": "tail", "top_k": 5, "beta": 2.0},
        # fp32 named, not "auto": on a GPU auto is bf16, and benchmarks/gpu_check.sh runs these tests there
        # (the bf16 test must compare with fp32; ZeRO-0 is fp32-only).
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                  "min_lr": 3e-4, "dtype": "fp32"},
        "parallel": {"tensor_parallel": 2, "deepspeed_config": os.path.join(ROOT, "ds_configs/zero3_tp.json")},
        "checkpoint": {"every": 100, "keep": 2},
        "eval": {"max_batches": 2},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path = assets["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), config["output_dir"]


def _launch(config_path, num_procs, extra=(), launcher_args=(), check=True, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [DEEPSPEED, *launcher_args] if launcher_args else [DEEPSPEED, "--num_gpus", str(num_procs),
                                                                  "--master_port", str(free_port())]
    command += ["--module", "launch.distill", "--config", config_path, *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as lines:
        records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def straight(assets):
    config, out = _config(assets, "straight")
    _launch(config, 2)
    return out


def test_tp2_run_learns_logs_and_exports(straight):
    losses = _losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    with open(os.path.join(straight, "metrics.jsonl")) as lines:
        records = [json.loads(line) for line in lines]
    assert {"loss", "kd", "lr", "grad_norm", "tokens_per_s", "teacher_tail_mass", "student_tail_mass", "head_kl",
            "tail_kl", "top1_agreement", "peak_memory_gb", "planned_peak_memory_gb"} <= set(records[-1])
    # CPU: peak RSS above the RSS before the models were built; models and optimizer state count.
    assert all(0 < record["peak_memory_gb"] < 24 for record in records if "loss" in record)
    # The plan of the job's own layout (training.plan), the same on every logged step.
    assert len({record["planned_peak_memory_gb"] for record in records if "loss" in record}) == 1
    assert 0 < records[-1]["planned_peak_memory_gb"] < 1
    assert {"eval/loss", "eval/nll", "eval/perplexity", "eval/full_ece", "eval/top1_ece", "eval/tail_divergence",
            "eval/forward_kl", "eval/reverse_kl", "eval/top1_agreement"} <= set(records[-1])
    bins = json.load(open(os.path.join(straight, "eval_bins.json")))
    assert bins["step"] == STEPS and len(bins["full"]) == 3 and len(bins["full"][0]) == 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(straight, "tensorboard")).Reload()
    for tag in ("train/loss", "train/kd", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/teacher_tail_mass", "train/student_tail_mass", "train/head_kl", "train/tail_kl",
                "train/top1_agreement", "train/peak_memory_gb", "train/planned_peak_memory_gb", "eval/loss"):
        assert tag in events.Tags()["scalars"], tag
    assert yaml.safe_load(open(os.path.join(straight, "config.yaml")))["loss"]["kind"] == "tail"
    assert open(os.path.join(straight, "checkpoints", "latest")).read() == f"step_{STEPS}"
    # DeepSpeed's zero_to_fp32.py, run out of habit, points at launch.export in one line.
    habit = subprocess.run([sys.executable, os.path.join(straight, "checkpoints", "zero_to_fp32.py"),
                            os.path.join(straight, "checkpoints"), "out"], capture_output=True, text=True)
    assert habit.returncode == 1 and habit.stderr.strip().splitlines() == [
        f"error: export the student with: python -m launch.export {os.path.join(straight, 'checkpoints')} OUT_DIR"]
    # Each rank's RNG states are a file of its own, listed in (and so verified by) the manifest.
    manifest = open(os.path.join(straight, "checkpoints", f"step_{STEPS}", "manifest.sha256")).read().split()
    assert {"rng_rank0.json", "rng_rank1.json"} <= set(manifest)
    state = json.load(open(os.path.join(straight, "checkpoints", f"step_{STEPS}", "rng_rank1.json")))
    assert set(state) == {"python", "numpy", "torch", "accelerator"} and len(state["torch"]) > 0


def _reference_eval_tail_divergence(student_dir, teacher_dir, eval_dir, tokens=512, data_parallel=1):
    """The job's final eval/tail_divergence (K 5, β 2, 2 batches of 2 rows per data-parallel rank:
    the first 4 x ``data_parallel`` rows), recomputed in one process with plain transformers models
    on the first ``tokens`` vocabulary columns (the rest is padding, which the job masks to -inf)."""
    from transformers import AutoModelForCausalLM

    from data.loader import Collator, eval_batches, load_prepared
    from loss import tail_divergence

    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    eval_set, _ = load_prepared(eval_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(eval_set, batch_size=2, dp_size=1, dp_rank=0, collator=Collator(0)):
            if count >= data_parallel * 2 * 2 * 31:
                break
            s = student(input_ids=batch["input_ids"]).logits[:, :-1, :tokens].reshape(-1, tokens)
            t = teacher(input_ids=batch["input_ids"]).logits[:, :-1, :tokens].reshape(-1, tokens)
            total += float(tail_divergence(s, t, top_k=5, beta=2.0).sum())
            count += s.shape[0]
    return total / count


def _final_record(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]


def test_export_round_trip_gives_the_engine_logits(straight, assets):
    """The exported student reproduces the training run's final eval loss when loaded plainly."""
    reference = _reference_eval_tail_divergence(os.path.join(straight, "student"), assets["teacher"], assets["eval"])
    # fp32 both ways; the job sums sharded slices over 2 ranks in another order than one process.
    assert reference == pytest.approx(_final_record(straight)["eval/tail_divergence"], rel=1e-4)


def _copy_run(run_dir, tmp_path):
    """A copy of a finished run, so that a refusal test that stopped refusing cannot alter the run
    other tests compare against."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_refuses_a_checkpoint_of_another_run(straight, assets, tmp_path):
    config, _ = _config(assets, "straight")
    copy = _copy_run(straight, tmp_path)
    result = _launch(config, 2, extra=["--set", f"output_dir={copy}", "--set", "loss.beta=1.0", "--set",
                                       "train.max_steps=10"], check=False)
    assert result.returncode == 2
    assert (f"error: checkpoint step_{STEPS} was written by a different run (loss.beta: checkpoint 2.0 vs config 1.0)"
            in result.stderr)


def test_bf16_run_tracks_the_fp32_run(straight, assets):
    """train.dtype bf16 (weights, activations and logits in bf16; fp32 master weights, Adam state,
    gradient accumulation and loss arithmetic) against the fp32 straight run, TP 2, 8 steps."""
    config, out = _config(assets, "bf16", train={"dtype": "bf16"})
    _launch(config, 2)
    bf16, fp32 = _losses(out), _losses(straight)
    assert bf16.keys() == fp32.keys()
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=BF16_TOLERANCE), step


@pytest.mark.parametrize("stage", [1, 2])
def test_student_zero_stage_trains_resumes_and_exports(straight, assets, tmp_path, stage):
    """parallel.student_zero_stage 1 and 2 (the JSON says "auto") at TP 2, from the same fresh
    student as the ZeRO-3 straight run (drawn from the seed alone at every stage): stopped at step 4
    and resumed, the losses follow the ZeRO-3 run; the export reproduces the run's evaluation;
    resuming at another stage is refused by name."""
    config, out = _config(assets, f"stage{stage}", parallel={"student_zero_stage": stage})
    _launch(config, 2, extra=["--set", "train.stop_at_step=4"])
    _launch(config, 2)
    losses, reference = _losses(out), _losses(straight)
    assert losses.keys() == reference.keys()
    for step in reference:
        # The same math; ZeRO-1/2 reduce gradients (all-reduce, then the local partition) in another
        # order than ZeRO-3's reduce-scatter: fp32 rounding, which 8 steps of AdamW keep below 1e-5.
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step
    exported = _reference_eval_tail_divergence(os.path.join(out, "student"), assets["teacher"], assets["eval"])
    assert exported == pytest.approx(_final_record(out)["eval/tail_divergence"], rel=1e-4)
    if stage == 2:
        copy = _copy_run(out, tmp_path)
        other = _launch(config, 2, extra=["--set", f"output_dir={copy}", "--set", "parallel.student_zero_stage=3",
                                          "--set", "train.max_steps=10"], check=False)
        assert other.returncode == 2 and (f"checkpoint step_{STEPS} holds a ZeRO-2 student and this run asks for "
                                          f"ZeRO-3") in other.stderr


def _grad_norms(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as lines:
        return {r["step"]: r["grad_norm"] for r in map(json.loads, lines) if "grad_norm" in r}


def test_tensor_parallel_size_and_a_plain_data_parallel_student_keep_the_losses(straight, assets):
    """TP 1 against the straight run's TP 2, with parallel.student_zero_stage 0 (DeepSpeed's plain
    data parallelism; fp32, TP 1 only) on 2 ranks as TP 1 x DP 2 and the straight run's global batch
    (2 x 1 x 2 sequences): stopped at step 4 and resumed, the losses and the gradient norms
    (all-reduced over the data-parallel ranks) follow the ZeRO-3 TP 2 run; the export reproduces the
    run's evaluation. The norms here stay below train.grad_clip; tests/test_plain_optimizer.py
    exercises the clip and the non-finite skip. (ZeRO-3 at TP 1 runs in the universal-resume test.)"""
    config, out = _config(assets, "stage0", parallel={"student_zero_stage": 0, "tensor_parallel": 1},
                          train={"grad_accum": 1})
    _launch(config, 2, extra=["--set", "train.stop_at_step=4"])
    _launch(config, 2)
    losses, reference = _losses(out), _losses(straight)
    norms, reference_norms = _grad_norms(out), _grad_norms(straight)
    assert losses.keys() == reference.keys() == norms.keys()
    for step in reference:
        # The same math in fp32 on other slices: reductions run in another order (measured ≤ 5e-6
        # for a ZeRO-3 TP 1 run).
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), step
        assert norms[step] == pytest.approx(reference_norms[step], rel=1e-4), step
    exported = _reference_eval_tail_divergence(os.path.join(out, "student"), assets["teacher"], assets["eval"],
                                               data_parallel=2)
    assert exported == pytest.approx(_final_record(out)["eval/tail_divergence"], rel=1e-4)


def test_activation_checkpointing_and_eager_attention_keep_the_losses(straight, assets):
    """train.activation_checkpointing (recomputed student layers) and eager attention in both models
    instead of transformers' choice (sdpa for Llama) against the straight run, TP 2, 8 steps."""
    config, out = _config(assets, "recompute", train={"activation_checkpointing": True},
                          student={"config": assets["student_config"], "attn_implementation": "eager"},
                          teacher={"path": assets["teacher"], "attn_implementation": "eager"})
    _launch(config, 2)
    recomputed, straight_losses = _losses(out), _losses(straight)
    assert recomputed.keys() == straight_losses.keys()
    for step in straight_losses:
        # Recomputation repeats the same fp32 ops; eager and sdpa attention differ by fp32 rounding
        # (softmax and matmul orders), which 8 steps of AdamW carry into the loss well below 1e-5.
        assert recomputed[step] == pytest.approx(straight_losses[step], rel=1e-5), step


@pytest.fixture(scope="module")
def four_ranks(assets):
    config, out = _config(assets, "four", teacher={"path": assets["padded_teacher"]}, train={"grad_accum": 1},
                          checkpoint={"every": 4})
    _launch(config, 4)
    return out


def test_tp2_dp2_on_four_ranks_learns(four_ranks):
    losses = _losses(four_ranks)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]


def test_two_simulated_nodes_match_one_node(four_ranks, assets):
    config, out = _config(assets, "two_nodes", teacher={"path": assets["padded_teacher"]}, train={"grad_accum": 1})
    hostfile = assets["root"] / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    port = str(free_port())
    run_simulated_nodes(lambda rank: _launch(config, 2, check=False, launcher_args=[
        "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
        "--master_port", port]))
    one_node, two_nodes = _losses(four_ranks), _losses(out)
    assert one_node.keys() == two_nodes.keys()
    for step in one_node:
        # The same 4 ranks and layout; only the rendezvous differs, but gloo may pick another
        # reduction order across "nodes", so allow fp32 rounding rather than demand bit equality.
        assert two_nodes[step] == pytest.approx(one_node[step], rel=1e-6), step


def test_gemma2_tied_softcapped_teacher_with_padded_vocabulary(assets):
    config, out = _config(assets, "gemma", teacher={"path": assets["gemma_teacher"]},
                          student={"config": assets["gemma_student_config"]}, train={"max_steps": 4})
    _launch(config, 2)
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(os.path.join(out, "student")).vocab_size == 520
    # The vocabulary-parallel job (TP 2, soft-capped logits, the tied teacher untied at load, padded
    # columns masked) evaluates what plain transformers computes on one process, to fp32 rounding
    # across 2 ranks' reduction orders.
    reference = _reference_eval_tail_divergence(os.path.join(out, "student"), assets["gemma_teacher"], assets["eval"])
    assert reference == pytest.approx(_final_record(out)["eval/tail_divergence"], rel=1e-4)


def test_config_error_names_the_key(assets):
    config, _ = _config(assets, "bad", train={"max_stepz": 3})
    result = subprocess.run([sys.executable, "-m", "launch.distill", "--config", config], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.max_stepz: unknown key (valid keys here: max_steps, stop_at_step, micro_batch_size, grad_accum, "
        "lr, warmup_steps, min_lr, weight_decay, grad_clip, max_consecutive_skips, dtype, activation_checkpointing)"]


def test_export_command_converts_a_checkpoint(straight, tmp_path):
    """python -m launch.export on the checkpoints directory gives the job's own export."""
    result = subprocess.run([sys.executable, "-m", "launch.export", os.path.join(straight, "checkpoints"),
                             str(tmp_path / "exported")], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    expected = load_file(os.path.join(straight, "student", "model.safetensors"))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "exported"))) == 512


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_evaluate_command_matches_the_jobs_evaluation(straight, assets, tmp_path, tensor_parallel):
    out = tmp_path / "eval.json"
    args = ["--model", os.path.join(straight, "student"), "--teacher", assets["teacher"], "--data", assets["eval"],
            "--batch-size", "2", "--max-batches", "2", "--top-k", "5", "--beta", "2.0", "--out", str(out),
            "--tensor-parallel", str(tensor_parallel), "--train-data", assets["train"]]
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = ([sys.executable, "-m", "eval.evaluate"] if tensor_parallel == 1 else
               [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "eval.evaluate"])
    result = subprocess.run(command + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(out))["metrics"]
    job = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))][-1]
    for name in ("nll", "tail_divergence", "forward_kl", "full_ece", "top1_agreement"):
        # The exported (gathered) weights in a fresh engine vs the training engine: fp32, other layouts
        # and reduction orders; abs for metrics near 0 (Full-ECE ~1e-5).
        assert metrics[name] == pytest.approx(job[f"eval/{name}"], rel=1e-4, abs=1e-6), name
    assert "perplexity" in result.stdout
    # The tail metrics, banded by the training corpus (tests/test_eval_metrics.py checks their values).
    bands = json.load(open(out))["bands"]
    assert bands["train_data"] == assets["train"] and sum(bands["positions"].values()) == metrics["tokens"]
    assert {"nll_frequent", "nll_middle"} <= metrics.keys()
    assert set(TAIL_METRICS) - set(bands["empty"]) <= metrics.keys()


def test_report_compares_runs_with_plots(straight, four_ranks, tmp_path):
    from PIL import Image

    from eval.report import write_report

    report = write_report([straight, four_ranks], str(tmp_path / "report"))
    lines = report["table"].strip().splitlines()
    assert lines[0].startswith("| run | loss | K | β | loss | nll | perplexity")
    assert lines[2].startswith("| straight | tail | 5 | 2.0 |") and lines[3].startswith("| four | tail | 5 | 2.0 |")
    final = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))][-1]
    assert f"{final['eval/nll']:.4f}" in lines[2]
    for path in report["plots"] + [report["reliability"]]:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    assert os.path.exists(tmp_path / "report" / "train_loss.png")
    from eval.summary import last_eval

    assert last_eval(straight)["step"] == STEPS and last_eval(straight)["eval/nll"] == final["eval/nll"]


def test_a_damaged_checkpoint_stops_every_rank_before_training(straight, assets, tmp_path):
    copy = _copy_run(straight, tmp_path)
    shard = sorted((copy / "checkpoints" / f"step_{STEPS}").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:64])
    config, _ = _config(assets, "straight")
    result = _launch(config, 2, extra=["--set", f"output_dir={copy}", "--set", "train.max_steps=10"], check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(line == errors[0] for line in errors)
    assert f"checkpoint step_{STEPS}: {shard} has 64 bytes" in errors[0]
    # checkpoint.fallback has nothing older to fall back to (keep=2 but only one save): still refused.
    fallback = _launch(config, 2, extra=["--set", f"output_dir={copy}", "--set", "train.max_steps=10", "--set",
                                         "checkpoint.fallback=true"], check=False)
    assert fallback.returncode == 2
    assert f"{shard} has 64 bytes" in fallback.stderr
    assert f"checkpoint.fallback found no complete, verified checkpoint in {copy / 'checkpoints'}" in fallback.stderr


def _shm_buffers():
    """DeepSpeed's shm all-reduce buffers in /dev/shm (see model_parallel.distributed)."""
    import glob

    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


def _start(config, extra, faults):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "DISTILL_FAULTS_DIR": faults}
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "launch.distill",
               "--config", config, *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_rank(launcher, local_rank):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
            child.kill()
            return
    raise AssertionError("rank not found")


def _stopped_within(launcher, seconds, marker):
    import time

    import psutil

    started = time.monotonic()
    returncode = launcher.wait(timeout=seconds)
    elapsed = time.monotonic() - started
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    return returncode, elapsed, leftovers


def _kill_when_held(config, tmp_path, rank, event):
    """Start the job on 2 ranks, let it run until ``rank`` reaches fault point ``event``, kill that
    rank there; returns (exit code, seconds the launcher took to stop, processes left)."""
    directory = faults_dir(tmp_path)
    launcher = _start(config, [], directory)
    driver = FaultDriver(directory, 2, rank=rank, event=event)
    try:
        driver.wait_held()
        _kill_rank(launcher, rank)
        return _stopped_within(launcher, 60, config)
    finally:
        driver.stop()
        if launcher.poll() is None:
            launcher.kill()


def test_killing_a_rank_mid_training_fails_fast_and_resume_finishes(straight, assets, tmp_path):
    config, out = _config(assets, "killed_training", checkpoint={"every": 2}, parallel={"timeout_s": 30})
    buffers_before = _shm_buffers()
    # Rank 1 is killed right after its third step; rank 0 goes on into step 4 and waits for it.
    returncode, elapsed, leftovers = _kill_when_held(config, tmp_path, 1, "step 3")
    assert returncode != 0 and elapsed < 60 and not leftovers
    assert _shm_buffers() <= buffers_before  # nothing of the killed job left in /dev/shm either
    resumed = _launch(config, 2)
    # loss.fused_head auto: this run and the straight one apply the heads inside the loss; resumed, bitwise the same.
    assert "fused head: on" in resumed.stderr
    assert _losses(out) == _losses(straight)
    # checkpoint.every 2, keep 2: only the last two complete tags remain.
    tags = sorted(t for t in os.listdir(os.path.join(out, "checkpoints")) if t.startswith("step_"))
    assert tags == ["step_6", "step_8"]


def test_killing_a_rank_during_a_save_keeps_the_previous_checkpoint(straight, assets, tmp_path):
    from training.checkpoint import COMPLETE, LATEST

    config, out = _config(assets, "killed_save", checkpoint={"every": 2}, parallel={"timeout_s": 30})
    root = os.path.join(out, "checkpoints")
    # Rank 1 has written its step-4 shards and is killed before the save's closing barrier.
    returncode, elapsed, leftovers = _kill_when_held(config, tmp_path, 1, "saving step_4")
    assert returncode != 0 and elapsed < 60 and not leftovers
    assert open(os.path.join(root, LATEST)).read() == "step_2"
    assert not os.path.exists(os.path.join(root, "step_4", COMPLETE))
    result = _launch(config, 2)
    assert f"checkpoint {os.path.join(root, 'step_4')} is incomplete" in result.stderr
    assert _losses(out) == _losses(straight)


def test_resume_on_another_layout_matches_the_straight_run(four_ranks, assets):
    """4 steps at TP 2 x DP 2, then resumed at TP 2 x DP 1 and TP 1 x DP 1 (grad_accum doubled, the
    same global batch) through DeepSpeed's universal checkpoint: the straight run's losses. The
    student's 512-row embedding was resized to the teacher's 520 rows: the added rows must be equal
    on every rank, or the replicated embedding cannot be re-laid out."""
    step_4 = os.path.join(four_ranks, "checkpoints", "step_4")
    straight = _losses(four_ranks)
    buffers_before = _shm_buffers()
    for name, tensor_parallel, procs in (("relayout_tp2_dp1", 2, 2), ("relayout_tp1_dp1", 1, 1)):
        config, out = _config(assets, name, teacher={"path": assets["padded_teacher"]}, train={"grad_accum": 2},
                              parallel={"tensor_parallel": tensor_parallel}, checkpoint={"resume": step_4})
        result = _launch(config, procs)
        converted = "converting checkpoint step_4 to the universal format" in result.stderr
        assert converted == (name == "relayout_tp2_dp1")  # converted once, then reused
        resumed = _losses(out)
        assert sorted(resumed) == [5, 6, 7, 8]
        for step in resumed:
            # Re-partitioned fp32 state and other reduction orders: straight runs at these layouts
            # already differ from TP 2 x DP 2 by up to 5e-6 (measured); the resumes stay within 4.2e-6.
            assert resumed[step] == pytest.approx(straight[step], rel=1e-5), (name, step)
    assert os.path.isfile(os.path.join(four_ranks, "checkpoints", "step_4_universal", "COMPLETE"))
    assert _shm_buffers() <= buffers_before


def test_convert_universal_command(four_ranks, tmp_path):
    from training.checkpoint import read_layout

    root = os.path.join(four_ranks, "checkpoints")
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "launch.convert_universal", root]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == os.path.join(root, f"step_{STEPS}_universal")  # what `latest` names
    assert read_layout(root, f"step_{STEPS}_universal")["data_parallel"] == 2
    embedding = torch.load(os.path.join(root, f"step_{STEPS}_universal", "zero", "model.embed_tokens.weight",
                                        "fp32.pt"), weights_only=False)["param"]
    assert embedding.shape == (520, 32)  # the replicated group, reassembled from all four ranks
    missing = subprocess.run(command + ["step_3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and f"error: checkpoint step_3: incomplete ({root}/step_3/COMPLETE is missing)" \
        in missing.stderr


def test_resume_with_another_global_batch_is_refused(four_ranks, assets, tmp_path):
    config, _ = _config(assets, "four", teacher={"path": assets["padded_teacher"]}, train={"grad_accum": 1},
                        checkpoint={"every": 4})
    copy = _copy_run(four_ranks, tmp_path)
    batch = _launch(config, 2, extra=["--set", f"output_dir={copy}", "--set", "train.max_steps=10"], check=False)
    assert batch.returncode == 2 and "global batch of 4 sequences, this run has 2" in batch.stderr


def test_shell_launcher_with_raw_files_prepared_on_the_fly(assets, demo_dir):
    """launch/distill.sh (one node) and data.train/data.eval given as raw text files."""
    config, out = _config(assets, "shell", data={"train": str(demo_dir / "pretrain/train.txt"),
                                                 "eval": str(demo_dir / "pretrain/eval.txt"), "seq_len": 32},
                          train={"max_steps": 2, "warmup_steps": 1})
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["bash", "launch/distill.sh", "--config", config], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_losses(out)) == [1, 2]
    manifest = json.load(open(os.path.join(out, "data", "train", "manifest.json")))
    assert manifest["seq_len"] == 32 and manifest["format"] == "text"
    assert os.path.exists(os.path.join(out, "data", "eval", "manifest.json"))


def _fp32_partitions(tag_dir):
    return [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
            for path in sorted(os.path.join(tag_dir, name) for name in os.listdir(tag_dir) if "optim_states" in name)]


def test_a_non_finite_step_is_skipped_on_every_rank_or_stops_the_job(assets):
    config, out = _config(assets, "nan", train={"max_steps": 5, "warmup_steps": 1},
                          checkpoint={"every": 1, "keep": 10})
    result = _launch(config, 2, extra=[], check=False, env={"DISTILL_FAULTS_NAN_TEACHER": "1:3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: step 3 skipped (non-finite loss on rank(s) [1]); parameters unchanged" in result.stderr
    records = {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r}
    assert [records[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert all(records[s]["loss"] == records[s]["loss"] for s in (4, 5))  # finite again after the skip
    checkpoints = os.path.join(out, "checkpoints")
    before, skipped, after = (_fp32_partitions(os.path.join(checkpoints, f"step_{s}")) for s in (2, 3, 4))
    same = lambda a, b: all(torch.equal(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))  # noqa: E731
    assert same(before, skipped) and not same(skipped, after)
    config, _ = _config(assets, "nan_stop", train={"max_steps": 5, "warmup_steps": 1, "max_consecutive_skips": 0})
    stopped = _launch(config, 2, check=False, env={"DISTILL_FAULTS_NAN_TEACHER": "1:3"})
    assert stopped.returncode != 0
    assert ("error: step 3: 1 consecutive steps skipped (non-finite loss on rank(s) [1]); stopping "
            "(train.max_consecutive_skips=0)") in stopped.stderr
