"""Rank 0's scalars: TensorBoard under ``output_dir/tensorboard`` and ``output_dir/metrics.jsonl``.

After a resume from step N both continue from N + 1: TensorBoard purges later events of the earlier
run (``purge_step``) and metrics.jsonl drops its lines past N, so every step appears once.
"""

import json
import os


class MetricsWriter:

    def __init__(self, output_dir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as old:
                kept = [line for line in old if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as new:
                new.writelines(kept)
        self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict) -> None:
        """``scalars`` keyed by TensorBoard tag (``train/loss``, ``eval/nll``); jsonl keys drop ``train/``."""
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.tensorboard.add_scalar(tag, value, step)
        record = {"step": step}
        record.update({tag.removeprefix("train/"): value for tag, value in scalars.items()})
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
