"""The plan as text (:func:`describe`): what ``launch.plan`` prints, the production config's
generated header, and the job's plan at start. Every figure an estimate."""

from typing import List

from training.plan.compare import Plan
from training.plan.estimates import assumptions
from training.plan.inputs import GB


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB" if abs(value) >= 0.01 * GB or value == 0 else f"{value / 1e6:.2f} MB"


def _layout_lines(result: Plan, compared: bool) -> List[str]:
    """The layout shown, how to select the fastest, and the DeepSpeed values chosen for it."""
    shown = result.shown
    which = "fastest that fits" if compared and shown is result.chosen else "as configured"
    lines = [f"  layout ({which}):"]
    lines += [f"    {key}: {value}" for key, value in shown.layout.as_config().items()]
    if result.chosen is not None and shown is not result.chosen:
        lines.append(f"  fastest that fits: {result.chosen.step_time_s:.3f} s/step with "
                     f"{result.chosen.layout.set_arguments()}")
    elif compared and result.chosen is not None:
        lines.append(f"  select it with: {shown.layout.set_arguments()}")
    if result.deepspeed:
        lines.append("  DeepSpeed JSON for it: " + ", ".join(f"{k}: {v}" for k, v in result.deepspeed.items()))
    return lines


def _figure_lines(result: Plan) -> List[str]:
    """Memory by term (and the reserve outside it), traffic by kind with its seconds, the step time."""
    cluster, shown = result.cluster, result.shown
    lines = [f"  memory per GPU: {_gb(shown.peak_memory_bytes)} of {cluster.gpu_memory_gb:g} GB"]
    lines += [f"    {term:<24} {_gb(value)}" for term, value in shown.memory.items()]
    if result.generation is not None:
        lines.append(f"    less {_gb(shown.overlap)}: generation's terms and the training phase's transients "
                     f"(activations, logits, ZeRO-3's gathered parameters) take turns")
    lines.append("    logits path: " + ("fused head (loss.fused_head): chunks of rows, no [tokens, vocab] tensor"
                                      if result.fused_head else "unfused: both models' [tokens, vocab] logits"))
    if shown.reserve:
        free = cluster.gpu_memory_gb * GB - shown.peak_memory_bytes - shown.reserve
        lines.append(f"    and outside it: CUDA context and NCCL buffers {_gb(shown.reserve)}; "
                     f"free {_gb(free)} ({free / (cluster.gpu_memory_gb * GB):.0%})")
    lines.append("  bytes per step per GPU handed to collectives:")
    lines += [f"    {kind:<24} {_gb(value)}  ({shown.seconds[kind]:.3f} s)" for kind, value in shown.traffic.items()]
    generating = (f"; generation {shown.seconds['generation']:.3f} s, expected over on_policy.fraction"
                  if result.generation is not None else "")
    lines.append(f"  step time: {shown.step_time_s:.3f} s (compute {shown.seconds['compute']:.3f} s{generating}); "
                 f"bottleneck: {shown.bottleneck}")
    return lines


def _generation_line(result: Plan) -> List[str]:
    """What an on-policy plan's generation figures are for (nothing off-policy)."""
    generation = result.generation
    if generation is None:
        return []
    source = {"text": "on_policy.prompt_tokens", "sft": "SFT rows: the bound seq_len - max_new_tokens"}.get(
        generation.prompt_source, generation.prompt_source)
    return [f"  on-policy: fraction {generation.fraction:g} of the steps generate {generation.new_tokens} tokens "
            f"after prompts of {generation.prompt_tokens} ({source}); GPU memory bandwidth "
            f"{result.cluster.hbm_gbps:g} GB/s"]


def describe(result: Plan, *, world_note: str = "") -> List[str]:
    """The plan as text lines (every figure an estimate)."""
    cluster, shown = result.cluster, result.shown
    lines = [f"plan (estimates) for {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, "
             f"{cluster.gpu_memory_gb:g} GB usable each{world_note}",
             f"  {cluster.tflops:g} TFLOP/s achieved per GPU, NVLink {cluster.nvlink_gbps:g} GB/s per GPU, "
             f"InfiniBand {cluster.ib_gbps:g} GB/s per node"]
    compared = len(result.estimates) > 1
    if compared:
        lines.append(f"  compared {len(result.estimates)} layouts, {sum(e.fits for e in result.estimates)} fit")
    lines += _generation_line(result)
    lines += _layout_lines(result, compared)
    lines += _figure_lines(result)
    if not shown.fits:
        lines.append(f"  WARNING: this layout will not fit: {shown.rejected}")
    if compared and result.chosen is None:
        where = (f"{result.smallest_cluster.nodes} node(s) x {result.smallest_cluster.gpus_per_node}"
                 if result.smallest_cluster else "no cluster of up to 64 such nodes")
        lines.append(f"  no layout fits on this cluster; the smallest that would: {where}")
    lines.append("  assumptions:")
    lines += [f"    - {assumption}" for assumption in assumptions(result.generation is not None)]
    return lines
