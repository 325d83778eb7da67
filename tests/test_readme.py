"""The README's data commands run as written (so they cannot rot)."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from datasets import load_from_disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands(prefix):
    with open(os.path.join(ROOT, "README.md")) as readme:
        return [line.strip() for line in readme if re.match(rf"^{re.escape(prefix)}", line.strip())]


@pytest.mark.e2e
def test_data_commands_run_as_written(tmp_path):
    commands = _readme_commands("python -m data.")
    assert [shlex.split(c)[2] for c in commands] == ["data.synthetic", "data.tokenizer", "data.prepare", "data.prepare"]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for command in commands:
        argv = shlex.split(command)
        result = subprocess.run([sys.executable] + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    blocks = load_from_disk(str(tmp_path / "runs/demo/prepared/pretrain-train"))
    assert len(blocks) > 1000 and all(len(row) == 256 for row in blocks[:10]["input_ids"])
    packed = load_from_disk(str(tmp_path / "runs/demo/prepared/sft-train"))
    assert all(len(row) <= 256 for row in packed["input_ids"])


def test_readme_lists_the_registered_loss_kinds():
    from loss.registry import LOSSES

    readme = open(os.path.join(ROOT, "README.md")).read()
    for entry in LOSSES.values():
        assert f"| `{entry.name}` | {entry.summary} |" in readme, entry.name


def _config_keys(cls, prefix=""):
    import dataclasses
    import typing

    for field in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(annotation):
            yield from _config_keys(annotation, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", field.default


def _as_yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def test_readme_configuration_table_lists_every_key_with_its_default():
    from training.config import RunConfig

    rows = {}
    for line in open(os.path.join(ROOT, "README.md")):
        match = re.match(r"^\| `([a-z_.]+)` \| `([^`]*)` \| .+ \|$", line.strip())
        if match:
            rows[match.group(1)] = match.group(2)
    expected = {key: _as_yaml(default) for key, default in _config_keys(RunConfig)}
    assert {key: rows.get(key) for key in expected} == expected
