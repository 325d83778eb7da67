"""The job's plan at start (training.job._planned_peak_gb): the errors the planner raises by design
(a ConfigError, an architecture it cannot shape, a file it cannot read) leave the job running with
"plan: not available"; anything else is a bug in the planner and surfaces."""

import json
import math
import os

import pytest
import torch

from core.errors import ConfigError
from training import job
from training.config import load_config
from training.plan import UnknownArchitecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def rank_0_on_cpu(monkeypatch):
    """``_planned_peak_gb`` as rank 0 of a one-rank job on the CPU, without a process group."""
    monkeypatch.setattr(job.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(job, "accelerator_device", lambda: torch.device("cpu"))


def _demo_config(*overrides):
    return load_config(os.path.join(ROOT, "launch/configs/demo_distill.yaml"),
                       ["parallel.tensor_parallel=1", *overrides])


def _planner_raising(error):
    def job_plan(cfg, **_):
        raise error
    return job_plan


@pytest.mark.parametrize("error", [ConfigError("parallel.tensor_parallel 3 must divide the 2 GPUs of a node"),
                                   UnknownArchitecture("student.json: transformers cannot build this architecture"),
                                   FileNotFoundError(2, "No such file or directory", "manifest.json"),
                                   PermissionError(13, "Permission denied", "config.json")])
def test_a_designed_planner_error_leaves_the_job_without_a_plan(monkeypatch, capsys, rank_0_on_cpu, error):
    monkeypatch.setattr(job, "job_plan", _planner_raising(error))
    assert math.isnan(job._planned_peak_gb(_demo_config(), world_size=1, bf16=False))
    assert capsys.readouterr().err.startswith(f"plan: not available ({type(error).__name__}: ")


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), KeyError("hidden_size"),
                                 AttributeError("'NoneType' object has no attribute 'heads'"), TypeError("bad")])
def test_a_bug_in_the_planner_surfaces(monkeypatch, rank_0_on_cpu, bug):
    monkeypatch.setattr(job, "job_plan", _planner_raising(bug))
    with pytest.raises(type(bug)):
        job._planned_peak_gb(_demo_config(), world_size=1, bf16=False)


def test_an_architecture_transformers_does_not_know_is_reported_not_raised(tmp_path, capsys, rank_0_on_cpu):
    """The real planner on a student config of an unknown model_type: UnknownArchitecture, named."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    cfg = _demo_config(f"student.config={tmp_path / 'config.json'}", "loss.kind=ce")
    assert math.isnan(job._planned_peak_gb(cfg, world_size=1, bf16=False))
    assert capsys.readouterr().err.startswith("plan: not available (UnknownArchitecture: ")


def test_a_missing_student_source_is_a_config_error(capsys, rank_0_on_cpu):
    cfg = _demo_config("student.config=null", "student.path=no/such/model", "loss.kind=ce")
    assert math.isnan(job._planned_peak_gb(cfg, world_size=1, bf16=False))
    assert "plan: not available (ConfigError: student.path: 'no/such/model'" in capsys.readouterr().err
