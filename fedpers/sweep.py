"""``python -m fedpers.sweep GRID.yaml``: strategies x partition settings x seeds, one results folder per cell.

A grid file (see ``experiments/configs/benchmark.yaml``)::

    output_dir: results/benchmark      # cells go to <output_dir>/<partition>/<strategy>/seed<k>/
    base: {run.rounds: 20, ...}        # experiment config fields shared by every cell (dotted or nested)
    strategies: [fedavg, {fedprox_mu0.1: {strategy.name: fedprox, strategy.mu: 0.1}}, ...]
    partitions: {dir0.1: {data.partitioner.alpha: 0.1}, ...}
    seeds: [0, 1, 2]

Every cell runs on the in-process engine. A cell whose folder holds a ``summary.json`` written for the
same resolved config is skipped, so an interrupted grid resumes where it stopped. The grid writes
``runs.csv`` (one row per cell), ``table.md`` (mean +- std over seeds) and ``plots/*.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedpers.config import ConfigError, ExperimentConfig, from_layers, from_yaml, to_yaml

log = logging.getLogger("fedpers")

COLUMNS = ["partition", "strategy", "seed", "status", "accuracy_mean", "accuracy_worst10", "unseen_accuracy_mean",
           "params_per_round", "bytes_per_round", "rounds", "wall_time_s", "output_dir", "error"]


@dataclass
class Cell:
    partition: str
    strategy: str
    seed: int
    cfg: ExperimentConfig

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.output_dir)


def nest(flat: dict) -> dict:
    """``{"run.rounds": 3, "data": {"partitioner.alpha": 1}}`` -> nested dicts."""
    out: dict = {}
    for key, value in (flat or {}).items():
        node = out
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict):
            node.setdefault(leaf, {})
            _merge(node[leaf], nest(value))
        else:
            node[leaf] = value
    return out


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _named(entries: Any, field: str, to_overrides) -> dict[str, dict]:
    """A list of names / ``{label: overrides}`` items, or one mapping, -> {label: overrides}."""
    if isinstance(entries, dict):
        return {str(k): dict(v or {}) for k, v in entries.items()}
    if not isinstance(entries, list) or not entries:
        raise ConfigError(field, "must be a non-empty list or mapping")
    out: dict[str, dict] = {}
    for e in entries:
        if isinstance(e, str):
            out[e] = to_overrides(e)
        elif isinstance(e, dict) and len(e) == 1:
            (label, ov), = e.items()
            out[str(label)] = dict(ov or {})
        else:
            raise ConfigError(field, f"entries are names or one-key mappings {{label: overrides}}, got {e!r}")
    return out


def load_grid(path: str | Path, extra_base: list[str] | None = None, only: dict[str, list[str]] | None = None,
              output_dir: str | None = None) -> tuple[Path, list[Cell]]:
    """Grid file -> (output dir, validated cells). Every cell's config is validated before any runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("grid", f"file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(raw) - {"output_dir", "base", "strategies", "partitions", "seeds"}
    if unknown:
        raise ConfigError(f"grid.{min(unknown)}", "unknown key; allowed: output_dir, base, strategies, partitions, seeds")
    out_dir = Path(output_dir or raw.get("output_dir") or "results/benchmark")
    base = nest(raw.get("base") or {})
    for item in extra_base or []:
        if "=" not in item:
            raise ConfigError(item, "overrides must look like key=value")
        _merge(base, nest(OmegaConf.to_container(OmegaConf.from_dotlist([item]))))
    strategies = _named(raw.get("strategies"), "grid.strategies", lambda n: {"strategy.name": n})
    partitions = _named(raw.get("partitions"), "grid.partitions", lambda n: {})
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise ConfigError("grid.seeds", f"must be a list of integers, got {seeds!r}")
    only = only or {}
    for key, table in (("strategies", strategies), ("partitions", partitions)):
        if only.get(key):
            missing = sorted(set(only[key]) - set(table))
            if missing:
                raise ConfigError(f"--{key}", f"unknown {missing}; the grid has: {', '.join(table)}")
            table_keep = {k: table[k] for k in only[key]}
            table.clear()
            table.update(table_keep)
    if only.get("seeds"):
        seeds = [int(s) for s in only["seeds"]]
    cells = []
    for p_label, p_over in partitions.items():
        for s_label, s_over in strategies.items():
            for seed in seeds:
                layer = dict(base)
                for over in (nest(p_over), nest(s_over)):
                    layer = _deep(layer, over)
                # The grid owns these: one folder per cell, the fast engine, no per-round bars.
                layer = _deep(layer, {"run": {"seed": seed, "engine": "inprocess", "progress": False,
                                              "output_dir": str(out_dir / p_label / s_label / f"seed{seed}")}})
                try:
                    cfg = from_layers([layer])
                except ConfigError as e:
                    raise ConfigError(e.field, f"{e} (grid cell {p_label}/{s_label}/seed{seed})") from None
                cells.append(Cell(p_label, s_label, seed, cfg))
    return out_dir, cells


def _deep(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    _merge(out, json.loads(json.dumps(b)))
    return out


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
           "output_dir": str(cell.out), "error": error}
    if status == "ok":
        s = json.loads((cell.out / "summary.json").read_text())
        f = s["final"]
        row.update({
            "accuracy_mean": f["accuracy_mean"],
            "accuracy_worst10": f["accuracy_worst10"],
            "unseen_accuracy_mean": f.get("unseen_accuracy_mean"),
            "params_per_round": s["params"]["down_per_client_round"] + s["params"]["up_per_client_round"],
            "bytes_per_round": s["bytes"]["down_per_client_round"] + s["bytes"]["up_per_client_round"],
            "rounds": s["rounds"],
            "wall_time_s": s["wall_time_s"],
        })
    return row


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def _fmt(vals: list, pct: bool = True) -> str:
    v = [float(x) for x in vals if x not in (None, "") and not math.isnan(float(x))]
    if not v:
        return "–"
    k = 100.0 if pct else 1.0
    return f"{k * np.mean(v):.1f} ± {k * np.std(v):.1f}"


def _sci(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def _pivot(ok: list[dict], parts: list[str], strats: list[str], key: str, name: str) -> list[str]:
    """One line per strategy, one column per partition setting: mean ± std over seeds of ``key``."""
    lines = [f"## {name} by partition setting (%)", "", "| strategy | bytes/round | " + " | ".join(parts) + " |",
             "|---|---|" + "---|" * len(parts)]
    for s in strats:
        rs = [r for r in ok if r["strategy"] == s]
        if not rs:
            continue
        cells = [_fmt([r[key] for r in rs if r["partition"] == p]) for p in parts]
        lines.append(f"| {s} | {_sci(float(np.mean([r['bytes_per_round'] for r in rs])))} | " + " | ".join(cells) + " |")
    seeds = {(r["partition"], r["strategy"]): 0 for r in ok}
    for r in ok:
        seeds[(r["partition"], r["strategy"])] += 1
    counts = sorted(set(seeds.values()))
    return lines + ["", f"Seeds per cell: {', '.join(map(str, counts))}.", ""]


def write_table(rows: list[dict], path: Path, title: str) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    parts = list(dict.fromkeys(r["partition"] for r in rows))
    strats = list(dict.fromkeys(r["strategy"] for r in rows))
    legend = ("Personalized test accuracy (%) on each client's own test split, mean ± std over seeds "
              "(std of the per-seed means). worst-10%: mean of the lowest 10% of clients. unseen: held-out "
              "clients after personalizing from the trained server state. params/bytes: per client and round, "
              "down + up.")
    lines = [f"# {title}", "", legend, ""]
    for key, name in (("accuracy_mean", "accuracy"), ("accuracy_worst10", "worst-10%"),
                      ("unseen_accuracy_mean", "unseen-client accuracy")):
        lines += _pivot(ok, parts, strats, key, name)
    for p in parts:
        lines += [f"## {p}", "", "| strategy | seeds | accuracy | worst-10% | unseen | params/round | bytes/round |",
                  "|---|---|---|---|---|---|---|"]
        for s in strats:
            rs = [r for r in ok if r["partition"] == p and r["strategy"] == s]
            if not rs:
                continue
            lines.append(f"| {s} | {len(rs)} | {_fmt([r['accuracy_mean'] for r in rs])} | "
                         f"{_fmt([r['accuracy_worst10'] for r in rs])} | "
                         f"{_fmt([r['unseen_accuracy_mean'] for r in rs])} | {_sci(rs[0]['params_per_round'])} | "
                         f"{_sci(float(np.mean([r['bytes_per_round'] for r in rs])))} |")
        lines.append("")
    from fedpers.stats_report import sections  # CIs and paired differences over per-client results

    lines += sections(rows)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failed or missing cells", ""] + [
            f"- {r['partition']}/{r['strategy']}/seed{r['seed']}: {r['status']} {r['error']}" for r in failed] + [""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    out.mkdir(parents=True, exist_ok=True)
    parts = list(dict.fromkeys(r["partition"] for r in ok))
    strats = list(dict.fromkeys(r["strategy"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(strats) * len(parts)), 4))
    width = 0.8 / len(parts)
    for j, p in enumerate(parts):
        means, stds = [], []
        for s in strats:
            v = [r["accuracy_mean"] for r in ok if r["partition"] == p and r["strategy"] == s]
            means.append(np.mean(v) if v else np.nan)
            stds.append(np.std(v) if v else 0)
        ax.bar(np.arange(len(strats)) + j * width, means, width, yerr=stds, label=p, capsize=2)
    ax.set_xticks(np.arange(len(strats)) + 0.4 - width / 2, strats, rotation=45, ha="right")
    ax.set_ylabel("personalized accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_strategy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in parts:
        for s in strats:
            rs = [r for r in ok if r["partition"] == p and r["strategy"] == s]
            if rs:
                x = max(1.0, float(np.mean([r["bytes_per_round"] for r in rs])))
                ax.scatter(x, np.mean([r["accuracy_mean"] for r in rs]), label=f"{p}" if s == strats[0] else None)
                ax.annotate(s, (x, np.mean([r["accuracy_mean"] for r in rs])), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per client and round (down + up; local = 1)")
    ax.set_ylabel("personalized accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)


def run_grid(out_dir: Path, cells: list[Cell], progress: bool = True) -> list[dict]:
    from fedpers import simulate

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    todo = []
    for i, cell in enumerate(cells):
        if is_done(cell):
            rows[i] = row_of(cell, "ok")
        else:
            todo.append(i)
    log.warning("grid: %d cells, %d already finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    bar = _bar(todo, progress)
    for i in bar:
        cell = cells[i]
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{cell.partition}/{cell.strategy}/seed{cell.seed}")
        (cell.out / "summary.json").unlink(missing_ok=True)  # a stale summary must not mark a rerun done
        try:
            simulate.run(cell.cfg)
            rows[i] = row_of(cell, "ok")
        except Exception as e:  # one broken cell must not lose the rest of the grid; its reason is recorded
            log.exception("cell %s/%s/seed%s failed", cell.partition, cell.strategy, cell.seed)
            rows[i] = row_of(cell, "failed", f"{type(e).__name__}: {e}")
        write_csv([rows[k] for k in sorted(rows)], out_dir / "runs.csv")
    ordered = [rows[k] for k in sorted(rows)]
    write_csv(ordered, out_dir / "runs.csv")
    return ordered


def _bar(it, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc="grid", unit="cell", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpers.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="grid YAML (see experiments/configs/benchmark.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value experiment fields applied to every cell's base")
    ap.add_argument("--strategies", help="comma-separated subset of the grid's strategy labels")
    ap.add_argument("--partitions", help="comma-separated subset of the grid's partition labels")
    ap.add_argument("--seeds", help="comma-separated seeds (replaces the grid's)")
    ap.add_argument("--output-dir", help="results folder (replaces the grid's output_dir)")
    ap.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--report-only", action="store_true",
                    help="write runs.csv, table.md and plots from the finished cells; run nothing (the rest are listed as missing)")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    only = {k: getattr(args, k).split(",") for k in ("strategies", "partitions", "seeds") if getattr(args, k)}
    try:
        out_dir, cells = load_grid(args.grid, args.overrides, only, args.output_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for c in cells:
            print(f"{'done' if is_done(c) else 'todo'}  {c.out}")
        return 0
    t0 = time.perf_counter()
    if args.report_only:
        rows = [row_of(c, "ok") if is_done(c) else row_of(c, "missing", "not run") for c in cells]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out_dir / "runs.csv")
    else:
        rows = run_grid(out_dir, cells, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    title = f"{Path(args.grid).name}: {len(cells)} cells"
    print(write_table(rows, out_dir / "table.md", title))
    plot(rows, out_dir / "plots")
    from fedpers.stats_report import plot as plot_ci

    plot_ci(rows, out_dir / "plots")
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"grid wall time this invocation: {wall:.0f}s; results in {out_dir} (runs.csv, table.md, plots/)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
