"""Convert a checkpoint to DeepSpeed's universal format, so another TP x DP layout can resume it.

DeepSpeed's ``ds_to_universal`` does the work; two things in 0.19.8 break it on our ZeRO-3 +
AutoTP checkpoints, and this module corrects both around it instead of rewriting it (a third,
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

The result is written beside the tag as ``<tag>_universal`` (in a temporary folder renamed
into place, with a completion marker), reused when it is already there, and pruned with its tag.
"""

import contextlib
import json
import os
import sys
from types import SimpleNamespace

import torch

from core.errors import CheckpointError
from core.files import atomic_directory, write_atomically
from training.checkpoint import COMPLETE, LAYOUT, ZERO_PARTITIONS, read_layout, universal_tag


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


@contextlib.contextmanager
def _corrected_converter(partitions):
    from functools import partial

    from deepspeed.checkpoint import ds_to_universal as converter

    originals = converter.extract_zero_shards_stage3, converter._load_universal_checkpoint_info_stage3
    converter.extract_zero_shards_stage3 = partial(_extract_fragments, partitions)
    converter._load_universal_checkpoint_info_stage3 = _without_empty_affine_maps(originals[1])
    try:
        yield converter
    finally:
        converter.extract_zero_shards_stage3, converter._load_universal_checkpoint_info_stage3 = originals


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
        write_atomically(os.path.join(staging, LAYOUT), json.dumps(layout))
        write_atomically(os.path.join(staging, COMPLETE), f"{tag}\n")
    return target

