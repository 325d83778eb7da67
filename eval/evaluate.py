"""Evaluate a student (and its agreement with a teacher) on prepared data.

    python -m eval.evaluate --model DIR [--teacher DIR] --data PREPARED_DIR [--train-data PREPARED_DIR] [--out eval.json]
    deepspeed --num_gpus 2 --module eval.evaluate --model DIR --teacher DIR --data DIR --tensor-parallel 2

Metrics (per valid next-token position, vocabulary-parallel under the launcher): NLL, perplexity,
top-1 accuracy, Full-ECE and top-1 ECE; with a teacher also forward KL, reverse KL, the tail-aware
divergence (``--top-k``, ``--beta``), teacher and student tail mass at K, top-1 agreement and the
teacher's own NLL/perplexity. ``--math-data`` adds greedy-generation accuracy on word problems.
``--train-data`` (the prepared training corpus, its ``token_counts.npy``) adds the tail metrics: NLL
by the target token's frequency band (``nll_frequent``, ``nll_middle``, ``nll_rare``; bands from
:func:`loss.metrics.frequency_bands`, stated under ``bands`` in the JSON), ``full_ece_rare`` and
``nll_rare_sequences``. Prints a table and writes the metrics (and calibration bins) as JSON to ``--out``.
"""

import argparse
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_METRICS = ("nll_frequent", "nll_middle", "nll_rare", "full_ece_rare", "nll_rare_sequences")
"""What ``--train-data`` adds (with ``tokens_<band>`` and ``rare_sequences``, the counts they average)."""


def _single_process_defaults() -> None:
    """Outside a launcher, run as a one-rank group."""
    from model_parallel.spawn import free_port

    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def print_table(metrics: dict) -> None:
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.6g}" if isinstance(value, float) else f"{name:<{width}}  {value}")


def token_bands(train_data: str, tokenizer):
    """:class:`loss.metrics.TokenBands` of the prepared training corpus ``train_data``, covering the
    tokenizer's vocabulary; refuses data of another tokenizer."""
    from data.manifest import check_tokenizer, read_manifest
    from data.token_counts import read_token_counts
    from loss.metrics import frequency_bands

    manifest = read_manifest(train_data)
    check_tokenizer(train_data, manifest, tokenizer)
    bands = frequency_bands(read_token_counts(train_data, manifest), vocab_size=len(tokenizer))
    return bands._replace(summary={"train_data": train_data, **bands.summary})


def evaluate_model(args) -> dict:
    import torch.distributed as dist

    from data.loader import Collator, eval_batches, load_prepared
    from training.config import LossConfig, StudentConfig, TeacherConfig
    from training.deepspeed_config import frozen_deepspeed_configs
    from training.engines import build_engines, use_bf16
    from training.step import evaluate

    bf16 = use_bf16("auto")
    ds_configs = frozen_deepspeed_configs(os.path.join(ROOT, "ds_configs/zero3_tp.json"),
                                          tensor_parallel=args.tensor_parallel, world_size=dist.get_world_size(),
                                          micro_batch_size=args.batch_size, bf16=bf16)
    engines = build_engines(student=StudentConfig(path=args.model),
                            teacher=TeacherConfig(path=args.teacher) if args.teacher else None,
                            tokenizer=args.tokenizer or args.model, tensor_parallel=args.tensor_parallel, seed=0,
                            ds_configs=ds_configs, bf16=bf16, train_student=False)
    loss_cfg = LossConfig(kind="tail" if args.teacher else "ce", top_k=args.top_k, beta=args.beta)
    dataset, _ = load_prepared(args.data, engines.tokenizer, key="data")
    batches = eval_batches(dataset, batch_size=args.batch_size, dp_size=engines.dp_size, dp_rank=engines.dp_rank,
                           collator=Collator(engines.tokenizer.pad_token_id))
    if args.max_batches:
        batches = (batch for _, batch in zip(range(args.max_batches), batches))
    bands = token_bands(args.train_data, engines.tokenizer) if args.train_data else None
    metrics, bins = evaluate(engines, loss_cfg, batches, n_bins=args.n_bins,
                             bands=None if bands is None else bands.band)
    if args.math_data and dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        from eval.math import math_accuracy, read_examples

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        scores = math_accuracy(model, engines.tokenizer, read_examples(args.math_data, args.math_examples),
                               max_new_tokens=args.max_new_tokens)
        metrics.update({f"math_{key}": value for key, value in scores.items()})
    result = {"model": args.model, "teacher": args.teacher, "data": args.data, "metrics": metrics, "bins": bins}
    return result if bands is None else with_bands(result, bands.summary)


def with_bands(result: dict, summary: dict) -> dict:
    """``result`` with the tail metrics' ``bands`` record (thresholds, evaluated positions per band,
    the rare-sequence share); a band without evaluated positions has no mean: its metrics are left
    out of ``metrics`` (not NaN) and named under ``bands.empty``."""
    from loss.metrics import BANDS, RARE_SEQUENCE_SHARE

    metrics = result["metrics"]
    empty = [name for name in TAIL_METRICS if math.isnan(metrics.get(name, math.nan))]
    positions = {name: metrics[f"tokens_{name}"] for name in BANDS}
    return {**result, "metrics": {name: value for name, value in metrics.items() if name not in empty},
            "bands": {**summary, "positions": positions, "rare_sequence_share": RARE_SEQUENCE_SHARE, "empty": empty}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory (e.g. an exported student)")
    parser.add_argument("--teacher", help="teacher model directory, for divergences and agreement")
    parser.add_argument("--data", required=True, help="directory written by data.prepare")
    parser.add_argument("--train-data", help="the prepared training corpus (data.prepare): its token counts "
                        "define the frequency bands of the tail metrics (default: no tail metrics)")
    parser.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    parser.add_argument("--out", default="eval.json", help="where to write the metrics (default eval.json)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="per rank; 0: the whole split")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--n-bins", type=int, default=10, help="calibration bins")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--math-data", help="JSONL of word problems for generation accuracy (rank 0)")
    parser.add_argument("--math-examples", type=int, default=0, help="0: all")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _single_process_defaults()
    import torch

    from model_parallel.distributed import init_distributed

    init_distributed()
    try:
        result = evaluate_model(args)
        if torch.distributed.get_rank() == 0:
            print_table(result["metrics"])
            with open(args.out, "w") as out:
                json.dump(result, out, indent=2)
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from model_parallel.distributed import exit_now

    from core.cli import run_main

    exit_now(run_main(main))
