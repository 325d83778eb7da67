"""The sweep's MiniPLM seam: the ``miniplm`` setting (ce on the documents the teacher finds likelier
than a small reference, selected by ``data.miniplm``), registered in :data:`eval.sweep_runs.SWEEP_ONLY`:
the reference trained once per sweep, the selection made once per teacher, and what both cost."""

import json
import os
import sys
import time
from typing import Dict, List, Optional

from core.errors import ConfigError, UserError
from core.files import sha256_of, write_atomically
from eval import sweep_runs as runs
from eval.sweep_runs import ROOT, SWEEP_ONLY, SweepOnly, Teacher


def miniplm_paths(out_dir: str, teacher: Optional[Teacher]) -> Dict[str, str]:
    """The reference's run directory (one per sweep), data.miniplm's output for ``teacher`` (None: the
    config's) and the log of both."""
    root = os.path.join(out_dir, "miniplm")
    return {"reference": os.path.join(root, "reference"), "log": os.path.join(root, "miniplm.log"),
            "selection": os.path.join(root, f"selection-{teacher.name}" if teacher else "selection")}


REFERENCE = "reference.json"
"""In the MiniPLM reference's directory: ``config`` (``--miniplm-reference`` as given) and its
``config_sha256``, recorded before its training starts, so a restart with another config is refused."""


def _reference_config(args) -> dict:
    """``--miniplm-reference`` as :data:`REFERENCE` records it (the path relative to the repository, as
    the launcher reads it)."""
    path = os.path.join(ROOT, args.miniplm_reference)
    if not os.path.isfile(path):
        raise ConfigError(f"--miniplm-reference {args.miniplm_reference}: no such config")
    return {"config": args.miniplm_reference, "config_sha256": sha256_of(path)}


def check_reference(args) -> None:
    """Refuse a ``--miniplm-reference`` that is missing, or that differs (path or content) from the one
    this sweep's reference was trained with (its :data:`REFERENCE`; none recorded: nothing to refuse)."""
    wanted = _reference_config(args)
    path = os.path.join(miniplm_paths(args.out, None)["reference"], REFERENCE)
    if os.path.isfile(path):
        with open(path) as handle:
            held = json.load(handle)
        if held != wanted:
            raise ConfigError(f"--miniplm-reference {args.miniplm_reference}: this sweep's reference "
                              f"({os.path.dirname(path)}) was trained with {held['config']} (sha256 "
                              f"{held['config_sha256'][:12]}), not this one (sha256 {wanted['config_sha256'][:12]}); "
                              "give that config or another --out")


def _train_reference(args, cfg) -> Optional[str]:
    """Train ``--miniplm-reference`` (unless exported already) on the sweep's tokenizer and training data,
    in the layout its ``parallel.*`` ``--set`` values give, recording its config (:data:`REFERENCE`);
    the error, or None."""
    paths = miniplm_paths(args.out, None)
    try:
        check_reference(args)
    except ConfigError as error:
        return str(error)
    if os.path.isfile(os.path.join(paths["reference"], "student", "config.json")):
        return None
    layout = [item for item in args.overrides if item.split("=", 1)[0].strip().startswith("parallel.")]
    overrides = [f"output_dir={paths['reference']}", f"data.train={cfg.data.train}", f"data.eval={cfg.data.eval}",
                 *([f"tokenizer={cfg.tokenizer}"] if cfg.tokenizer else []), *layout]
    os.makedirs(paths["reference"], exist_ok=True)
    write_atomically(os.path.join(paths["reference"], REFERENCE), json.dumps(_reference_config(args), indent=1))
    began = time.monotonic()
    code = runs.run_logged(runs.distill_command(args.launcher_args, args.miniplm_reference, overrides), paths["log"])
    runs.add_train_seconds(paths["reference"], time.monotonic() - began)
    if code != 0 or not os.path.isfile(os.path.join(paths["reference"], "student", "config.json")):
        return f"training the MiniPLM reference failed: {runs.last_error(paths['log'])} (log: {paths['log']})"
    return None


def _selection_done(args, cfg, teacher: Optional[Teacher]) -> bool:
    """Whether ``teacher``'s selection is prepared already for this request as the sweep can tell it
    without the reference: the same raw inputs, block length, ``--miniplm-keep`` and teacher path (so a
    reference deleted or retrained after it does not void it)."""
    from data.manifest import read_manifest
    from data.miniplm import input_names

    prepared = os.path.join(miniplm_paths(args.out, teacher)["selection"], "prepared")
    if not os.path.isfile(os.path.join(prepared, "manifest.json")):
        return False
    request = read_manifest(prepared).get("miniplm", {}).get("request", {})
    train = read_manifest(cfg.data.train)
    inputs = input_names(train["inputs"], ROOT)  # as data.miniplm names them, run from the repository
    teacher_path = os.path.abspath(os.path.join(ROOT, teacher.path if teacher else cfg.teacher.path))
    return ([item.get("path", item.get("name")) for item in request.get("inputs", [])] == inputs
            and request.get("seq_len") == train["seq_len"] and request.get("keep") == args.miniplm_keep
            and request.get("teacher", {}).get("path") == teacher_path)


def text_corpus(cfg) -> dict:
    """``data.train``'s manifest; refuses data that is not prepared, or not text (pre-training documents)."""
    from data.manifest import read_manifest

    manifest = read_manifest(cfg.data.train)
    if manifest["format"] != "text":
        raise ConfigError(f"--losses miniplm selects pre-training documents; data.train {cfg.data.train} is "
                          f"{manifest['format']!r} data")
    return manifest


def miniplm_command(args, cfg, teacher: Optional[Teacher]) -> List[str]:
    """``data.miniplm`` on the raw inputs ``data.train`` was prepared from (its manifest's, relative to
    the repository), at its block length, with ``--miniplm-keep``."""
    manifest = text_corpus(cfg)
    paths = miniplm_paths(args.out, teacher)
    teacher_path = teacher.path if teacher else cfg.teacher.path
    return [sys.executable, "-m", "data.miniplm", "--input", *manifest["inputs"], "--tokenizer",
            cfg.tokenizer or teacher_path, "--teacher", teacher_path, "--reference",
            os.path.join(paths["reference"], "student"), "--seq-len", str(manifest["seq_len"]), "--out",
            paths["selection"], "--keep", str(args.miniplm_keep)]


def _prepare_miniplm(args, cfg, teacher: Optional[Teacher]) -> Optional[str]:
    """The reference, then the selection for ``teacher`` (both reused where they exist; a selection of
    the same request (:func:`_selection_done`) is reused without the reference); the error, or None."""
    try:
        if _selection_done(args, cfg, teacher):
            return None
    except UserError as error:  # data.train is not prepared data
        return str(error)
    error = _train_reference(args, cfg)
    if error:
        return error
    try:
        command = miniplm_command(args, cfg, teacher)
    except UserError as error:  # data.train is not prepared text
        return str(error)
    log = miniplm_paths(args.out, teacher)["log"]
    if runs.run_logged(command, log) != 0:
        return f"data.miniplm failed: {runs.last_error(log)} (log: {log})"
    return None


SWEEP_ONLY["miniplm"] = SweepOnly(
    "ce", "MiniPLM: ce on the --miniplm-keep of documents with the largest teacher - reference log-probability "
          "(data.miniplm; the reference: --miniplm-reference)",
    lambda args, teacher: [f"data.train={os.path.join(miniplm_paths(args.out, teacher)['selection'], 'prepared')}"],
    _prepare_miniplm)


def miniplm_costs(out_dir: str, grid) -> List[dict]:
    """Per miniplm setting of ``grid`` (eval.sweep's settings) whose selection exists: what making it cost (once, for every seed): the
    reference's training seconds, each model's scoring seconds and estimated FLOPs, and the counts
    kept (data.miniplm's manifest)."""
    from data.manifest import read_manifest

    out = []
    for setting in grid:
        prepared = os.path.join(miniplm_paths(out_dir, setting.teacher)["selection"], "prepared")
        if setting.sweep_only != "miniplm" or not os.path.isfile(os.path.join(prepared, "manifest.json")):
            continue
        section = read_manifest(prepared)["miniplm"]
        out.append({"setting": setting.path, "keep": section["request"]["keep"], "counts": section["counts"],
                    "reference_train_seconds": runs.train_seconds(miniplm_paths(out_dir, None)["reference"]),
                    "scoring": section["cost"]})
    return out
