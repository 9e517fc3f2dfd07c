"""Experiment tracking: TensorBoard event files beside the results (``run.tensorboard=true``).

``<output_dir>/tensorboard`` gets, per round, the aggregate accuracies, bytes up and down per client,
failures and round time, each client's accuracy (``client/<id>/accuracy``), and at the end the
results plots as images. ``tensorboard --logdir results`` compares runs side by side. Weights & Biases
users can mirror the same files with ``wandb sync <output_dir>/tensorboard`` (the optional ``wandb``
extra), so fedpers needs no second logging path.
"""

from __future__ import annotations

import math
from pathlib import Path

ROUND_SCALARS = {  # metrics.jsonl key -> TensorBoard tag
    "accuracy_mean": "accuracy/mean",
    "accuracy_std": "accuracy/std",
    "accuracy_worst10": "accuracy/worst10",
    "accuracy_weighted": "accuracy/weighted",
    "test_loss_mean": "loss/test_mean",
    "bytes_up_per_client": "bytes/up_per_client",
    "bytes_down_per_client": "bytes/down_per_client",
    "num_ok": "clients/ok",
    "num_failed": "clients/failed",
    "num_timed_out": "clients/timed_out",
    "round_time_s": "time/round_s",
}


class TensorBoardLog:
    def __init__(self, out: Path, first_round: int = 1):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: after a resume, events a killed run wrote past its checkpoint are dropped.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_round if first_round > 1 else None)

    def round(self, row: dict) -> None:
        step = row["round"]
        for key, tag in ROUND_SCALARS.items():
            value = row.get(key)
            if value is not None and not math.isnan(value):  # NaN (no valid reply) is left out, not plotted as 0
                self.writer.add_scalar(tag, float(value), step)
        for pid, c in row.get("clients", {}).items():
            self.writer.add_scalar(f"client/{pid}/accuracy", float(c["accuracy"]), step)
        self.writer.flush()

    def finish(self, out: Path, step: int) -> None:
        import matplotlib.image as mpimg

        for png in sorted(out.glob("*.png")):
            img = mpimg.imread(png)[..., :3]  # RGBA floats in [0, 1] -> RGB
            self.writer.add_image(f"plots/{png.stem}", img, step, dataformats="HWC")
        self.writer.close()
