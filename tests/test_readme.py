"""The README's data commands run as written (so they cannot rot)."""

import os
import re
import shlex
import subprocess
import sys

from datasets import load_from_disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands(prefix):
    with open(os.path.join(ROOT, "README.md")) as readme:
        return [line.strip() for line in readme if re.match(rf"^{re.escape(prefix)}", line.strip())]


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
    assert f"`loss.kind` (`{' | '.join(LOSSES)}`)" in readme
    for entry in LOSSES.values():
        assert f"| `{entry.name}` | {entry.summary} |" in readme, entry.name
