"""A sweep's cell: what it is, whether it is done, its row in ``runs.csv``, and running one.

The lowest floor of :mod:`fedpers.sweep`: the executors (:mod:`~fedpers.sweep.local`,
:mod:`~fedpers.sweep.ray_cluster`) and the command line (:mod:`~fedpers.sweep.cli`) all import it, and it
imports none of them.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path

from fedpers.config import ConfigError, ExperimentConfig, to_yaml
from fedpers.experiment import from_yaml
from fedpers.sweep.selection import val_fields


@dataclass
class Cell:
    partition: str
    strategy: str
    seed: int
    cfg: ExperimentConfig
    setting: str = ""  # the partition label without the axis level (grids with an ``axis``)
    axis_value: float | None = None  # the axis value of this cell (inf = the axis' ``full`` value)

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.output_dir)


def is_done(cell: Cell) -> bool:
    """Finished with the same resolved config (a changed grid re-runs the cells it changed). A config
    saved before a field existed counts as having that field's default, so adding a config field to
    fedpers does not re-run a finished grid; a cell that now sets it to another value does re-run."""
    summary, saved = cell.out / "summary.json", cell.out / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    text, now = saved.read_text(), to_yaml(cell.cfg)
    if text == now:
        return True
    try:
        return to_yaml(from_yaml(text)) == now
    except ConfigError:  # a field it set no longer exists (or no longer validates)
        return False


def row_of(cell: Cell, status: str, error: str = "") -> dict:
    row = {"partition": cell.partition, "strategy": cell.strategy, "seed": cell.seed, "status": status,
           "output_dir": str(cell.out), "error": error, "setting": cell.setting or cell.partition,
           "axis_value": "" if cell.axis_value is None else cell.axis_value}
    if status == "ok":
        s = json.loads((cell.out / "summary.json").read_text())
        f = s["final"]
        row.update({
            "accuracy_mean": f["accuracy_mean"],
            "accuracy_worst10": f["accuracy_worst10"],
            "accuracy_weighted": f.get("accuracy_weighted"),  # sum correct / sum test samples (PFLlib's figure)
            "unseen_accuracy_mean": f.get("unseen_accuracy_mean"),
            "cross_eval_gap": (f.get("cross_eval") or {}).get("gap"),  # run.cross_eval: own - others accuracy
            "params_per_round": s["params"]["down_per_client_round"] + s["params"]["up_per_client_round"],
            "bytes_per_round": s["bytes"]["down_per_client_round"] + s["bytes"]["up_per_client_round"],
            "rounds": s["rounds"],
            # optimizer steps per client per round (absent from summaries written before it was recorded)
            "local_steps": (s.get("local_steps") or {}).get("per_client_round"),
            "wall_time_s": s["wall_time_s"],
            # LLM cells: token-weighted perplexity of the reply tokens (absent for other modalities)
            "perplexity_mean": f.get("perplexity_mean"),
            "perplexity_worst10": f.get("perplexity_worst10"),
            "unseen_perplexity_mean": f.get("unseen_perplexity_mean"),
            # data.val_fraction > 0: the validation-best round and the test figures there
            **val_fields(s),
        })
    return row


def run_cell(cfg_yaml: str) -> tuple[str, str]:
    """Run one cell in this process; ``("ok", "")`` or ``("failed", "Type: message")``. The config travels
    as YAML and is validated again here, so a worker whose fedpers or data differs fails loudly."""
    from fedpers import simulate
    from fedpers.experiment import from_yaml

    try:
        simulate.run(from_yaml(cfg_yaml), overwrite=True)  # an unfinished cell's folder is the grid's to redo
        return "ok", ""
    except Exception as e:  # noqa: BLE001  (one broken cell must not lose the grid; its reason is recorded)
        traceback.print_exc()
        return "failed", f"{type(e).__name__}: {e}"
