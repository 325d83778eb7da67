"""Convert a checkpoint to DeepSpeed's universal format, so another TP x DP layout can resume it.

DeepSpeed's ``ds_to_universal`` does the work; three things in 0.19.8 break it on our ZeRO-3 +
AutoTP checkpoints, and this module corrects them around it instead of rewriting it (a fourth,
in loading the result, is corrected in ``training.checkpoint.load``):

- ZeRO-3 partitions the tensor-parallel *replicated* parameters (embedding, norms) over all
  TP x DP ranks, the sharded ones over DP only. The converter assumes DP everywhere and then
  reads past the end of the replicated group. So every save records how each optimizer file's
  groups are partitioned (``training.checkpoint.zero_partitions``, kept in ``layout.json``), and
  :func:`_extract_fragments` cuts each file's flat groups by that record: a replicated
  parameter's pieces are filed under every TP index in partition order, so each TP index
  reassembles the whole parameter and the converter's "replicated" merge takes it as is.
- AutoTP records an affine map for the replicated parameters while ZeRO-3 has them partitioned
  (logical shape ``[0]``); the converter would rebuild them as empty tensors. Those entries are
  dropped, so the replicated-parameter patterns the checkpoint also carries apply.
- A checkpoint saved at TP 1 goes through the converter's plain ZeRO-3 merge, which saves each
  state as a bare tensor; the loader cuts a tensor-parallel shard only out of a ``{"param": ...}``
  dict, so a TP > 1 run got every whole matrix and failed ("start + length exceeds dimension
  size"). :func:`_merge_zero3_slices` saves the same tensors in that dict.

A Gemma-2 student is tied at TP 1 and untied at TP > 1 (``training.engines``: AutoTP cannot
share its scaled embedding), so a TP-1 checkpoint holds one matrix where a TP > 1 run trains two.
The conversion of such a checkpoint (``layout.json``'s ``head`` record) also files the tied matrix
under the head's name (:func:`_untie_head`): the untied head starts as a copy of the trained tied
matrix, Adam moments included (a fresh untied run's head also starts as the embedding's copy); a
tied run still loads the one matrix. The other direction
is refused before conversion (``training.resume._check_head``).

The result is written beside the tag as ``<tag>_universal`` (in a temporary folder renamed
into place, with a completion marker), reused when it is already there, and pruned with its tag.
"""

import contextlib
import json
import os
import shutil
import sys
from types import SimpleNamespace

import torch

from core.errors import CheckpointError
from core.files import atomic_directory, write_atomically
from training.checkpoint import COMPLETE, HEAD, LAYOUT, ZERO_PARTITIONS, read_layout, universal_tag


def _extract_fragments(partitions, optim_files_grid, param_shapes_grid, dp_degree, temp_dir, indices,
                       exclude_param_names=None):
    """Replacement for ``ds_to_universal.extract_zero_shards_stage3`` (same arguments after
    ``partitions``): dump each parameter's piece of one optimizer file, indexed by its partition
    rank, under its TP index, or under every TP index when its group spans the TP ranks."""
    from deepspeed.checkpoint import ds_to_universal as converter

    tp_index, dp_index = indices
    tp_degree = len(optim_files_grid)
    path = optim_files_grid[tp_index][dp_index]
    groups = partitions[os.path.basename(path)]
    optimizer_state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    for group, shapes in enumerate(param_shapes_grid[tp_index]):
        count, rank = groups[group]
        if count not in (dp_degree, dp_degree * tp_degree):
            raise CheckpointError(f"{path}: optimizer group {group} is partitioned over {count} ranks, neither the "
                              f"data-parallel ({dp_degree}) nor the whole ({dp_degree * tp_degree}) world")
        states = {
            "fp32": optimizer_state["fp32_flat_groups"][group],
            "exp_avg": optimizer_state["optimizer_state_dict"]["state"][group]["exp_avg"],
            "exp_avg_sq": optimizer_state["optimizer_state_dict"]["state"][group]["exp_avg_sq"],
        }
        tp_indices = range(tp_degree) if count > dp_degree else [tp_index]
        offset = 0
        for name, shape in shapes.items():
            numel = converter._shape_numel(shape)
            partition_numel, _ = converter._zero_partitioned_param_info(numel, count)
            owned = max(0, min(partition_numel, numel - rank * partition_numel))  # the last rank's is short
            if name not in (exclude_param_names or ()):
                for index in tp_indices:
                    for key, flat in states.items():
                        converter.dump_param_fragment(temp_dir, index, rank, key, flat, name, offset, owned)
            offset += partition_numel


def _without_empty_affine_maps(load_info):
    def patched(model_files):
        info = load_info(model_files)
        params = info.get("affine_map", {}).get("params", {})
        for pattern in [p for p, spec in params.items() if not all(spec["logical_shape"])]:
            del params[pattern]
        return info

    return patched


def _merge_zero3_slices(dp_degree, dir, slice_dir, name):
    """Replacement for ``ds_to_universal.merge_zero3_slices`` (TP-1 checkpoints): the same merged
    flat tensors, saved as ``{"param": tensor}`` so that a TP > 1 load cuts its shard out of them."""
    from deepspeed.checkpoint import ds_to_universal as converter
    from deepspeed.checkpoint.constants import PARAM

    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        merged = converter._merge_zero_shards(os.path.join(slice_dir, name), state, 1)[0]
        converter._save_checkpoint(os.path.join(dir, name, f"{state}.pt"), {PARAM: merged})


@contextlib.contextmanager
def _corrected_converter(partitions):
    from functools import partial

    from deepspeed.checkpoint import ds_to_universal as converter

    originals = (converter.extract_zero_shards_stage3, converter._load_universal_checkpoint_info_stage3,
                 converter.merge_zero3_slices)
    converter.extract_zero_shards_stage3 = partial(_extract_fragments, partitions)
    converter._load_universal_checkpoint_info_stage3 = _without_empty_affine_maps(originals[1])
    converter.merge_zero3_slices = _merge_zero3_slices
    try:
        yield converter
    finally:
        (converter.extract_zero_shards_stage3, converter._load_universal_checkpoint_info_stage3,
         converter.merge_zero3_slices) = originals


def _untie_head(universal_dir: str, record) -> None:
    """Where ``record`` (``layout.json``'s ``head``) says the head was tied to a scaled embedding,
    give ``universal_dir`` the tied matrix under both parameter names (each ``zero/<name>/`` holds its
    fp32 weight and Adam moments), so a run that unties the head loads it as the embedding's copy."""
    if not record or not record["tied"] or not record["scaled_embedding"]:
        return
    zero = os.path.join(universal_dir, "zero")
    names = [record["embedding"], record["head"]]
    present = [name for name in names if os.path.isdir(os.path.join(zero, name))]
    if not present:
        raise CheckpointError(f"{zero}: neither {names[0]} nor {names[1]} was converted (the tied head's matrix)")
    for name in names:
        if name not in present:
            shutil.copytree(os.path.join(zero, present[0]), os.path.join(zero, name))


def convert(root: str, tag: str, workers: int = 1) -> str:
    """Write ``root/<tag>_universal`` from the verified checkpoint ``root/tag`` (one process, no
    collectives) unless it is already complete; returns its tag."""
    target = universal_tag(tag)
    if os.path.isfile(os.path.join(root, target, COMPLETE)):
        return target
    layout = read_layout(root, tag)
    if ZERO_PARTITIONS not in layout:
        raise CheckpointError(f"checkpoint {tag}: {os.path.join(root, tag, LAYOUT)} has no {ZERO_PARTITIONS} record "
                          f"(written before this version); resume it at its own layout")
    print(f"converting checkpoint {tag} to the universal format ({os.path.join(root, target)})", file=sys.stderr)
    with atomic_directory(os.path.join(root, target)) as staging:
        args = SimpleNamespace(input_folder=os.path.join(root, tag), output_folder=staging,
                               num_extract_workers=workers, num_merge_workers=workers, keep_temp_folder=False,
                               strict=True, inject_missing_state=False)
        with _corrected_converter(layout[ZERO_PARTITIONS]) as converter, contextlib.redirect_stdout(sys.stderr):
            converter.main(args)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, "latest_universal"))  # DeepSpeed's own pointer; `latest` stays ours
        _untie_head(staging, layout.get(HEAD))
        write_atomically(os.path.join(staging, LAYOUT), json.dumps(layout))
        write_atomically(os.path.join(staging, COMPLETE), f"{tag}\n")
    return target

