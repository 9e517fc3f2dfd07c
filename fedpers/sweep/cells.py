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
    fedpers does not re-run a finished grid; a cell that now sets it to another value does re-run. Where
    the folder lives (``run.output_dir``) is not compared: a grid's folder may be moved or renamed."""
    summary, saved = cell.out / "summary.json", cell.out / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    text, now = saved.read_text(), to_yaml(cell.cfg)
    if text == now:
        return True
    try:
        return to_yaml(_here(from_yaml(text), cell.cfg)) == now
    except ConfigError:  # a field it set no longer exists (or no longer validates)
        return False


def _here(saved: ExperimentConfig, cfg: ExperimentConfig) -> ExperimentConfig:
    """A saved config with ``cfg``'s folder and way of starting (run.output_dir, run.resume, run.overwrite):
    where a run lives and whether it was resumed are not part of its experiment."""
    saved.run.output_dir, saved.run.resume, saved.run.overwrite = cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite
    return saved


def resumable(cfg: ExperimentConfig) -> bool:
    """An unfinished cell stopped after a round (the sweep or its machine stopped mid-cell): its folder
    holds a checkpoint and the config it ran with is ``cfg``'s."""
    out = Path(cfg.run.output_dir)
    if (out / "summary.json").is_file() or not (out / "checkpoint.pt").is_file() or not (out / "config.yaml").is_file():
        return False
    try:
        return to_yaml(_here(from_yaml((out / "config.yaml").read_text()), cfg)) == to_yaml(cfg)
    except ConfigError:
        return False


def finished(cell: Cell) -> bool:
    """The cell's folder holds a finished run, with whatever config."""
    return (cell.out / "summary.json").is_file()


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_fields(cell: Cell) -> list[str]:
    """``"field: saved -> now"`` for each config field in which the finished run in the cell's folder
    differs from the cell (its saved config read as :func:`is_done` reads it: missing fields at their
    defaults)."""
    import yaml

    now = _flat(yaml.safe_load(to_yaml(cell.cfg)))
    saved_file = cell.out / "config.yaml"
    if not saved_file.is_file():
        return ["config.yaml: missing"]
    text = saved_file.read_text()
    try:
        saved = _flat(yaml.safe_load(to_yaml(_here(from_yaml(text), cell.cfg))))
    except ConfigError:  # a field it set no longer exists: compare what it says
        try:
            saved = {**_flat(yaml.safe_load(text) or {}), "run.output_dir": str(cell.cfg.run.output_dir)}
        except yaml.YAMLError:
            return ["config.yaml: unreadable"]
    absent = "(absent)"
    return [f"{k}: {saved.get(k, absent)} -> {now.get(k, absent)}" for k in sorted(set(now) | set(saved))
            if saved.get(k, absent) != now.get(k, absent)]


OTHER_CONFIG = "other_config"  # runs.csv status of a cell finished with a config other than the grid's now


def report_row(cell: Cell) -> dict:
    """A cell's runs.csv row from its folder alone: ``ok``; ``other_config`` (finished with another config:
    its figures, and the differing fields in ``error``); or ``missing``."""
    if not finished(cell):
        return row_of(cell, "missing", "not run")
    try:
        if is_done(cell):
            return row_of(cell, "ok")
        return {**row_of(cell, "ok"), "status": OTHER_CONFIG,
                "error": "finished with another config: " + "; ".join(changed_fields(cell))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return row_of(cell, "failed", f"unreadable summary.json: {type(e).__name__}: {e}")


def folder_rows(out_dir: Path, known: set[str]) -> list[dict]:
    """Rows of the finished cells under ``out_dir`` (``<partition>/.../<strategy>/seed<k>/summary.json``) whose
    folders no cell in ``known`` (output_dir strings) names: a seed or label no longer in the grid."""
    rows = []
    for summary in sorted(out_dir.rglob("summary.json")):
        folder, parts = summary.parent, summary.parent.relative_to(out_dir).parts
        if str(folder) in known or len(parts) < 3 or not (parts[-1].startswith("seed") and parts[-1][4:].isdigit()):
            continue
        row = {"partition": "/".join(parts[:-2]), "strategy": parts[-2], "seed": int(parts[-1][4:]),
               "status": OTHER_CONFIG, "output_dir": str(folder), "setting": parts[0], "axis_value": "",
               "error": "finished, not a cell of this grid"}
        try:
            row.update(summary_fields(folder))
        except (OSError, ValueError, KeyError, TypeError) as e:
            row.update(status="failed", error=f"unreadable summary.json: {type(e).__name__}: {e}")
        rows.append(row)
    return rows


def runs_rows(rows: list[dict], every: list[Cell], out_dir: Path | None) -> list[dict]:
    """runs.csv: ``rows`` (this invocation's cells), then a :func:`report_row` for every other cell of the
    whole grid and a row for every other finished cell in ``out_dir`` (None: no scan), sorted by partition,
    strategy, seed (in the order they first appear), so a partial or changed invocation never drops a
    finished cell."""
    by_dir = {r["output_dir"]: r for r in rows}
    for c in every:
        if str(c.out) not in by_dir:
            by_dir[str(c.out)] = report_row(c)
    if out_dir is not None and out_dir.is_dir():
        for r in folder_rows(out_dir, set(by_dir)):
            by_dir[r["output_dir"]] = r
    parts = list(dict.fromkeys(r["partition"] for r in by_dir.values()))
    strats = list(dict.fromkeys(r["strategy"] for r in by_dir.values()))
    return sorted(by_dir.values(), key=lambda r: (parts.index(r["partition"]), strats.index(r["strategy"]),
                                                  int(r["seed"])))


def row_of(cell: Cell, status: str, error: str = "") -> dict:
    row = {"partition": cell.partition, "strategy": cell.strategy, "seed": cell.seed, "status": status,
           "output_dir": str(cell.out), "error": error, "setting": cell.setting or cell.partition,
           "axis_value": "" if cell.axis_value is None else cell.axis_value}
    if status == "ok":
        row.update(summary_fields(cell.out))
    return row


def _mean(per_client: dict | None) -> float | None:
    return sum(per_client.values()) / len(per_client) if per_client else None


def summary_fields(folder: Path) -> dict:
    """The runs.csv figures of a finished cell, from its summary.json."""
    s = json.loads((folder / "summary.json").read_text())
    f = s["final"]
    return {
        "accuracy_mean": f["accuracy_mean"],
        "accuracy_worst10": f["accuracy_worst10"],
        "accuracy_weighted": f.get("accuracy_weighted"),  # sum correct / sum test samples (PFLlib's figure)
        "unseen_accuracy_mean": f.get("unseen_accuracy_mean"),
        "cross_eval_gap": (f.get("cross_eval") or {}).get("gap"),  # run.cross_eval: own - others accuracy
        # LLM cells with run.cross_eval: others - own perplexity (how much worse a speaker's model does elsewhere)
        "cross_eval_perplexity_gap": (f.get("cross_eval") or {}).get("perplexity_gap"),
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
        # LLM cells: the mean over clients of the reply NLL per token (nats; the log of each client's
        # perplexity), which one diverged client cannot carry as it can the perplexity mean
        "nll_mean": _mean(f.get("per_client_loss")),
        # data.val_fraction > 0: the validation-best round and the test figures there
        **val_fields(s),
    }


def run_cell(cfg_yaml: str) -> tuple[str, str]:
    """Run one cell in this process; ``("ok", "")`` or ``("failed", "Type: message")``. The config travels
    as YAML and is validated again here, so a worker whose fedpers or data differs fails loudly. A cell
    stopped after a round with this config continues from its checkpoint (:func:`resumable`; exact, as
    ``run.resume`` is); any other unfinished cell's folder is the grid's to redo."""
    import logging

    from fedpers import simulate
    from fedpers.experiment import from_yaml
    from fedpers.results.checkpoint import CheckpointError

    try:
        cfg = from_yaml(cfg_yaml)
        if resumable(cfg):
            cfg.run.resume = True
            try:
                logging.getLogger("fedpers").warning("sweep: %s continues from its checkpoint", cfg.run.output_dir)
                simulate.run(cfg)
                return "ok", ""
            except CheckpointError as e:  # unreadable or not this run's: start the cell again
                logging.getLogger("fedpers").warning("sweep: %s starts again: %s", cfg.run.output_dir, e)
                cfg.run.resume = False
        simulate.run(cfg, overwrite=True)
        return "ok", ""
    except Exception as e:  # noqa: BLE001  (one broken cell must not lose the grid; its reason is recorded)
        traceback.print_exc()
        return "failed", f"{type(e).__name__}: {e}"
