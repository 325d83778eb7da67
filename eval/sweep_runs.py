"""What eval.sweep and its MiniPLM seam (eval.sweep_miniplm) share: the teachers, the sweep-only
settings' registry, and running one logged, timed command (a deepspeed training launch or a data step)."""

import argparse
import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional

from core.files import write_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository: every command runs here (relative config and data paths are read from it)."""


class Teacher(NamedTuple):
    """One teacher of ``--teachers``: its name (a directory level of the sweep) and model path."""

    name: str
    path: str


@dataclass(frozen=True)
class SweepOnly:
    """A setting of the comparison that is no registry loss kind: a registry kind trained on other
    inputs (``miniplm``: ``ce`` on a selected corpus). Named ``--losses`` values, trained once per
    seed and teacher, never with K, β or temperature."""

    kind: str
    """The registry ``loss.kind`` its runs train with."""
    summary: str
    """One line for ``--help``."""
    overrides: Callable[[argparse.Namespace, Optional[Teacher]], List[str]]
    """``(args, teacher) -> ["key=value", ...]``: what a run sets besides ``loss.kind`` (e.g.
    ``data.train``), for its teacher (None: the config's)."""
    prepare: Optional[Callable[[argparse.Namespace, object, Optional[Teacher]], Optional[str]]] = None
    """``(args, cfg, teacher) -> error or None``: makes those inputs, once per teacher before its first
    run that is not done (restartable: what exists is reused); its runs fail with the error."""


SWEEP_ONLY: Dict[str, SweepOnly] = {}
"""The sweep-only settings by ``--losses`` name."""


def last_error(log_path: str) -> str:
    """The log's last line that names an error, else its last non-empty line."""
    try:
        with open(log_path, errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "Error" in line or line.startswith("error:"):
            return line[-300:]
    return lines[-1][-300:] if lines else "empty log"


def run_logged(command: List[str], log_path: str, env=None) -> int:
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def distill_command(launcher_args: str, config: str, overrides: List[str]) -> List[str]:
    """``launch.distill`` under the deepspeed launcher, on a free local rendezvous port."""
    from model_parallel.spawn import free_port

    return (["deepspeed", *shlex.split(launcher_args), "--master_port", str(free_port()), "--module",
             "launch.distill", "--config", config] + [item for o in overrides for item in ("--set", o)])


TIMING = "timing.json"
"""In a run's (or the MiniPLM reference's) directory: ``train_seconds``, the wall-clock seconds of its
training commands (launcher start-up included), summed over restarts."""


def add_train_seconds(run_dir: str, seconds: float) -> None:
    """Add ``seconds`` to the directory's :data:`TIMING` ``train_seconds``, replacing the file atomically."""
    path = os.path.join(run_dir, TIMING)
    before = 0.0
    if os.path.isfile(path):
        with open(path) as handle:
            before = json.load(handle)["train_seconds"]
    write_atomically(path, json.dumps({"train_seconds": before + seconds}))  # a kill mid-write would lose the sum


def train_seconds(run_dir: str) -> Optional[float]:
    """The run's :data:`TIMING` ``train_seconds``, or None where it has none."""
    path = os.path.join(run_dir, TIMING)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)["train_seconds"]
