"""The one table ``benchmarks/gpu_check.sh`` ends with: per run, planned against measured peak
memory, tokens/s, host syncs per step and an MFU estimate.

    python benchmarks/gpu_summary.py [--peak-tflops T] LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Reads each run's ``metrics.jsonl`` and ``config.yaml`` (written by the job) and
``host_syncs_rank0.json`` (``benchmarks/sync_count.py``). Step 1 (allocations, kernel selection,
lazy initialisation) is left out of tokens/s and of the sync counts where later steps exist.

- peak memory: the largest logged ``peak_memory_gb`` (the job's ``torch.cuda.max_memory_allocated``,
  reset at each logged step) against ``planned_peak_memory_gb`` (``training.plan`` for the job's layout);
- tokens/s: the mean over logged steps of the job's ``tokens_per_s`` (tokens of all ranks per step);
- host syncs per step: the median and the largest count of rank 0's steps;
- MFU, an estimate: model FLOPs per token, 6·N_student + 2·N_teacher (backward and forward of the
  student, the teacher's forward) plus attention's 12·L·h·d·S (student) and 4·L·h·d·S (teacher) per
  PaLM's appendix B, where N counts the weights that multiply (the input embedding is a lookup; a
  tied head counts once), times tokens/s, over the ranks' peak dense bf16 FLOP/s. The peak is
  ``--peak-tflops``, else ``GPU_PEAK_TFLOPS``, else looked up from the GPU's name (PEAK_BF16_TFLOPS).
"""

import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s (no sparsity); first match wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0)]


def peak_tflops_for(name: str):
    """The dense bf16 peak of the GPU named ``name`` (``torch.cuda.get_device_name``), or None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def _model_config(path: str):
    """The Hugging Face config of a model directory or of a config JSON file."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def flops_per_token(config, seq_len: int, trained: bool) -> float:
    """Model FLOPs per token of a causal LM with ``config``: 6·N + 12·L·h·d·S when ``trained``
    (forward and backward), 2·N + 4·L·h·d·S for a forward only (PaLM, appendix B)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    matmul = total if head is embedding else total - embedding.numel()  # the lookup does no FLOPs
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return (6 * matmul + 12 * attention) if trained else (2 * matmul + 4 * attention)


def run_row(label: str, run_dir: str, peak_tflops) -> dict:
    """The table's figures for one run (``None`` where a figure is missing)."""
    import yaml

    row = {"label": label}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        row["missing"] = f"no {metrics} (the run failed or did not start)"
        return row
    records = [json.loads(line) for line in open(metrics)]
    records = [r for r in records if "loss" in r]
    later = [r for r in records if r["step"] > 1] or records
    row["steps"] = len(records)
    row["measured_gb"] = max((r.get("peak_memory_gb", math.nan) for r in records), default=math.nan)
    row["planned_gb"] = records[-1].get("planned_peak_memory_gb", math.nan) if records else math.nan
    row["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in later) if later else math.nan
    syncs_path = os.path.join(run_dir, "host_syncs_rank0.json")
    world_size = 1
    if os.path.exists(syncs_path):
        syncs = json.load(open(syncs_path))
        world_size = syncs["world_size"]
        counts = syncs["steps"][1:] or syncs["steps"]
        if syncs["mode"] == "warn" and counts:
            row["syncs_median"], row["syncs_max"] = statistics.median(counts), max(counts)
            row["sync_sites"] = list(syncs["sites"].items())[:5]
    row["ranks"] = world_size
    if peak_tflops and records and math.isfinite(row["tokens_per_s"]):
        cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
        seq_len = _seq_len(cfg)
        student = _model_config(cfg["student"].get("path") or cfg["student"]["config"])
        per_token = flops_per_token(student, seq_len, trained=True)
        if cfg.get("teacher", {}).get("path"):
            per_token += flops_per_token(_model_config(cfg["teacher"]["path"]), seq_len, trained=False)
        row["mfu"] = per_token * row["tokens_per_s"] / (world_size * peak_tflops * 1e12)
    return row


def _seq_len(cfg: dict) -> int:
    """The run's sequence length: its prepared data's (manifest.json), else data.seq_len (raw files)."""
    manifest = os.path.join(cfg["data"]["train"], "manifest.json")
    if os.path.exists(manifest):
        return json.load(open(manifest))["seq_len"]
    return cfg["data"]["seq_len"]


def _number(value, form: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, form)


def table(rows, peak_tflops) -> str:
    """The rows as one Markdown table, with the sync sites and the MFU's basis stated below it."""
    lines = ["| run | ranks | steps | planned peak GB | measured peak GB | measured / planned | tokens/s "
             "| host syncs / step, median (max) | MFU, estimate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for row in rows:
        if "missing" in row:
            lines.append(f"| {row['label']} | - | - | - | - | - | - | - | - |")
            notes.append(f"{row['label']}: {row['missing']}")
            continue
        ratio = row["measured_gb"] / row["planned_gb"] if row["planned_gb"] else math.nan
        syncs = (f"{row['syncs_median']:g} ({row['syncs_max']})" if "syncs_median" in row else "-")
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        lines.append(f"| {row['label']} | {row['ranks']} | {row['steps']} | {_number(row['planned_gb'], '.2f')} "
                     f"| {_number(row['measured_gb'], '.2f')} | {_number(ratio, '.2f')} "
                     f"| {_number(row['tokens_per_s'], ',.0f')} | {syncs} | {mfu} |")
        if row.get("sync_sites"):
            notes.append(f"{row['label']}: most host syncs at " + ", ".join(f"{site} ({count})"
                                                                             for site, count in row["sync_sites"]))
    basis = (f"MFU: (6·N_student + 2·N_teacher + attention) FLOPs per token x tokens/s over ranks x "
             f"{peak_tflops:g} TFLOP/s dense bf16 peak: an estimate" if peak_tflops else
             "MFU: no peak bf16 FLOP/s known for this GPU (set GPU_PEAK_TFLOPS)")
    return "\n".join(notes + [basis, ""] + lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, TFLOP/s (default: GPU_PEAK_TFLOPS, else from its name)")
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    args = parser.parse_args(argv)
    peak = args.peak_tflops or (float(os.environ["GPU_PEAK_TFLOPS"]) if os.environ.get("GPU_PEAK_TFLOPS") else None)
    if peak is None:
        import torch

        peak = peak_tflops_for(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    rows = []
    for run in args.runs:
        label, _, run_dir = run.rpartition("=")
        if not label:
            parser.error(f"{run!r} is not LABEL=RUN_DIR")
        rows.append(run_row(label, run_dir, peak))
    print(table(rows, peak))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
