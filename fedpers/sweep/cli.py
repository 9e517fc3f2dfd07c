"""``python -m fedpers.sweep GRID.yaml``: strategies x partition settings x seeds, one results folder per cell.

A grid file (see ``experiments/configs/benchmark.yaml``)::

    output_dir: results/benchmark      # cells go to <output_dir>/<partition>/<strategy>/seed<k>/
    base: {run.rounds: 20, ...}        # experiment config fields shared by every cell (dotted or nested)
    strategies: [fedavg, {fedprox_mu0.1: {strategy.name: fedprox, strategy.mu: 0.1}}, ...]
    partitions: {dir0.1: {data.partitioner.alpha: 0.1}, ...}
    seeds: [0, 1, 2]
    reference: pfedpg                  # table.md's paired differences are to this strategy label (default pfedpg);
                                       # a list ([local, pfedpg]) gives a table per reference, the first one leads
    axis:                              # optional: one numeric config field swept within every partition setting
      field: data.max_train_per_client
      values: [2, 8, 32, full]         # numbers; "full" = the field's value full_value (here: no cap)
      full_value: 0
      label: n                         # cells go to <output_dir>/<partition>/n<value>/<strategy>/seed<k>/

With an ``axis``, the report adds ``plots/regimes.png`` (paired difference to the reference with its 95% CI
band against the axis, per setting; ``regimes_unseen.png`` for held-out clients) and a crossover table.

Every cell runs on the in-process engine. A cell whose folder holds a ``summary.json`` written for the
same resolved config is skipped, so an interrupted grid resumes where it stopped. A finished cell whose
resolved config differs (an override, a changed grid) is refused before anything runs, naming the cell
and the fields: choose another ``--output-dir`` to keep both, or ``--rerun-changed`` to replace it. The
grid writes ``runs.csv`` (one row per cell of the whole grid, whatever subset this invocation runs, and
one per other finished cell of the folder; status ok, failed, missing, or other_config: finished with a
config other than the grid's now, its figures kept), ``table.md`` (mean +- std over seeds, ok cells) and
``plots/*.png``.

Cells run in ``--jobs N`` local worker processes (default: one per core, the cores' torch threads
divided among them), or with ``--ray-address`` as tasks on an existing Ray cluster (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpers.config import ConfigError, load_yaml_mapping
from fedpers.experiment import from_layers
from fedpers.sweep.cells import (
    Cell,
    changed_fields,
    finished,
    is_done,
    report_row,
    row_of,  # noqa: F401  (importable from here, as before)
    runs_rows,
)
from fedpers.sweep.local import run_grid  # the executors live there; run_grid stays importable from here
from fedpers.sweep.report import COLUMNS, plot, write_csv, write_table  # noqa: F401  (the report lives there)
from fedpers.sweep.selection import parse_select, selected_rows
from fedpers.sweep.stats import REFERENCE

log = logging.getLogger("fedpers")




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


GRID_KEYS = ("output_dir", "base", "strategies", "partitions", "seeds", "reference", "axis", "select")
AXIS_KEYS = ("field", "values", "full_value", "label")


def parse_axis(raw) -> dict | None:
    """The grid's ``axis`` -> {field, label, points: [(folder label, config value, axis value)]}, or None."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("grid.axis", f"must be a mapping with keys {', '.join(AXIS_KEYS)}, got {raw!r}")
    unknown = set(raw) - set(AXIS_KEYS)
    if unknown:
        raise ConfigError(f"grid.axis.{min(unknown)}", f"unknown key; allowed: {', '.join(AXIS_KEYS)}")
    field = raw.get("field")
    if not isinstance(field, str) or "." not in field:
        raise ConfigError("grid.axis.field", f"must be a dotted config field such as data.max_train_per_client, got {field!r}")
    label = str(raw.get("label") or field.rsplit(".", 1)[-1])
    values = raw.get("values")
    if not isinstance(values, list) or not values:
        raise ConfigError("grid.axis.values", "must be a non-empty list of numbers (and optionally 'full')")
    points = []
    for v in values:
        if v == "full":
            if "full_value" not in raw:
                raise ConfigError("grid.axis.full_value", "'full' in grid.axis.values needs full_value: the field's "
                                                          "value that means all (e.g. 0 for no cap)")
            points.append((f"{label}full", raw["full_value"], float("inf")))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            points.append((f"{label}{v:g}", v, float(v)))
        else:
            raise ConfigError("grid.axis.values", f"entries are finite numbers or 'full', got {v!r}")
    if len({p[0] for p in points}) != len(points):
        raise ConfigError("grid.axis.values", f"repeats a value: {values}")
    return {"field": field, "label": label, "points": points}


def read_grid(path: str | Path) -> dict:
    """A grid file as a dict, read as ``--config`` files are (:func:`fedpers.config.load_yaml_mapping`): a
    missing, binary, malformed or non-mapping file is a ConfigError naming it, never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("grid", f"file not found: {path}")
    loaded = load_yaml_mapping(path, "grid", f"grid keys ({', '.join(GRID_KEYS)})")
    try:
        return OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as e:  # a ${...} interpolation that does not resolve
        raise ConfigError("grid", f"{path}: {str(e).splitlines()[0]}") from None


def grid_reference(path: str | Path) -> str | list[str]:
    """The strategy label table.md's paired differences are taken to (the grid's ``reference``, default
    pfedpg); :func:`load_grid` has checked that the grid has it."""
    return read_grid(path).get("reference", REFERENCE)


def grid_select(path: str | Path) -> dict[str, list[str]]:
    """The grid's ``select`` groups (see :mod:`fedpers.sweep.selection`); :func:`load_grid` checked them."""
    raw = read_grid(path)
    return parse_select(raw.get("select"), [str(k) for k in _named(raw.get("strategies"), "grid.strategies",
                                                                   lambda n: {"strategy.name": n})])


def load_grid(path: str | Path, extra_base: list[str] | None = None, only: dict[str, list[str]] | None = None,
              output_dir: str | None = None) -> tuple[Path, list[Cell]]:
    """Grid file -> (output dir, validated cells). Every cell's config is validated before any runs."""
    raw = read_grid(path)
    unknown = set(raw) - set(GRID_KEYS)
    if unknown:
        raise ConfigError(f"grid.{min(unknown)}", f"unknown key; allowed: {', '.join(GRID_KEYS)}")
    out_dir = Path(output_dir or raw.get("output_dir") or "results/benchmark")
    base = nest(raw.get("base") or {})
    for item in extra_base or []:
        if "=" not in item:
            raise ConfigError(item, "overrides must look like key=value")
        _merge(base, nest(OmegaConf.to_container(OmegaConf.from_dotlist([item]))))
    strategies = _named(raw.get("strategies"), "grid.strategies", lambda n: {"strategy.name": n})
    partitions = _named(raw.get("partitions"), "grid.partitions", lambda n: {})
    groups = parse_select(raw.get("select"), list(strategies))  # checked here, applied by the report
    reference = raw.get("reference")
    refs = reference if isinstance(reference, list) else [reference]
    allowed = list(strategies) + list(groups)  # a select group's label names its validation-chosen variant
    bad = [r for r in refs if r not in allowed]
    if reference is not None and (bad or not refs):  # unset: pfedpg, if the grid has it
        raise ConfigError("grid.reference", f"{bad[0] if bad else reference!r} is not one of the grid's strategy "
                                            f"or select-group labels: {', '.join(allowed)}")
    axis = parse_axis(raw.get("axis"))
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
    levels = [(p, over, None, None) for p, over in partitions.items()] if axis is None else [
        (f"{p}/{folder}", {**over, axis["field"]: value}, p, x)
        for p, over in partitions.items() for folder, value, x in axis["points"]]
    for p_label, p_over, setting, x in levels:
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
                cells.append(Cell(p_label, s_label, seed, cfg, setting or "", x))
    return out_dir, cells


def _deep(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    _merge(out, json.loads(json.dumps(b)))
    return out


def execution_flags(args) -> dict | None:
    """Check --jobs / --ray-address / --cell-cpus / --cell-gpus; the Ray settings, or None for local."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", f"must be >= 1, got {args.jobs}")
    if args.ray_address is None:
        for flag, value in (("--cell-cpus", args.cell_cpus), ("--cell-gpus", args.cell_gpus)):
            if value is not None:
                raise ConfigError(flag, "only applies with --ray-address (local cells use --jobs)")
        return None
    if args.jobs is not None:
        raise ConfigError("--jobs", "does not apply with --ray-address: Ray runs as many cells at once as "
                                    "the cluster has room for (--cell-cpus, --cell-gpus)")
    if not args.ray_address.strip():
        raise ConfigError("--ray-address", "must be HOST:PORT of a running Ray head, or 'auto'")
    cpus = 1.0 if args.cell_cpus is None else args.cell_cpus
    gpus = 0.0 if args.cell_gpus is None else args.cell_gpus
    if cpus <= 0:
        raise ConfigError("--cell-cpus", f"must be > 0, got {cpus}")
    if gpus < 0:
        raise ConfigError("--cell-gpus", f"must be >= 0, got {gpus}")
    return {"address": args.ray_address.strip(), "cpus": cpus, "gpus": gpus}


def whole_grid(grid, overrides, output_dir, out_dir: Path, cells: list[Cell]) -> list[Cell]:
    """The cells runs.csv lists: every strategy and partition of the grid at its seeds, and at any other
    seed with a finished cell in ``out_dir`` (an earlier ``--seeds``), as this invocation resolves them."""
    seeds = set(read_grid(grid).get("seeds") or [0])
    found = {int(p.name[4:]) for p in out_dir.rglob("seed*") if p.name[4:].isdigit()} if out_dir.is_dir() else set()
    found |= {c.seed for c in cells}
    every = load_grid(grid, overrides, {"seeds": sorted(seeds | found)}, output_dir)[1]
    return [c for c in every if c.seed in seeds or finished(c)]


def refusal(changed: list[Cell], out_dir: Path, show: int = 20) -> str:
    """The error for finished cells that this invocation would replace with another config."""
    head = (f"error: {len(changed)} finished cell(s) in {out_dir} hold a run of another config; running "
            f"would replace them (field: finished run -> now):")
    lines = [head]
    for c in changed[:show]:
        fields = changed_fields(c)
        more = f"; and {len(fields) - 5} more" if len(fields) > 5 else ""
        lines.append(f"  {c.partition}/{c.strategy}/seed{c.seed}: {'; '.join(fields[:5])}{more}")
    if len(changed) > show:
        lines.append(f"  ... and {len(changed) - show} more")
    lines.append("Nothing was run. To keep them, choose another --output-dir; to replace these cells, add "
                 "--rerun-changed; --dry-run lists them as 'changed'.")
    return "\n".join(lines)


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
    ap.add_argument("--rerun-changed", action="store_true",
                    help="replace finished cells whose resolved config differs (refused without it)")
    ap.add_argument("--report-only", action="store_true",
                    help="write runs.csv, table.md and plots from the finished cells; run nothing (the rest are listed as "
                         "missing, cells finished with another config as other_config)")
    ap.add_argument("--jobs", type=int, help="cells run at once in local worker processes, each with cores/N torch "
                    "threads (default: one per core; 1 = in this process)")
    ap.add_argument("--ray-address", help="run the cells as tasks on an existing Ray cluster: its address "
                    "(HOST:PORT) or 'auto' (see docs/cluster.md)")
    ap.add_argument("--cell-cpus", type=float, help="with --ray-address: CPUs each cell reserves, and its torch threads (default 1)")
    ap.add_argument("--cell-gpus", type=float, help="with --ray-address: GPUs each cell reserves (default 0)")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    only = {k: getattr(args, k).split(",") for k in ("strategies", "partitions", "seeds") if getattr(args, k)}
    try:
        ray = execution_flags(args)
        out_dir, cells = load_grid(args.grid, args.overrides, only, args.output_dir)
        every = whole_grid(args.grid, args.overrides, args.output_dir, out_dir, cells)
        reference = grid_reference(args.grid)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    changed = [c for c in cells if finished(c) and not is_done(c)]
    if args.dry_run:
        changed_ids = {id(c) for c in changed}
        for c in cells:
            print(f"{'done' if is_done(c) else 'changed' if id(c) in changed_ids else 'todo'}  {c.out}")
        return 0
    if changed and not (args.rerun_changed or args.report_only):
        print(refusal(changed, out_dir), file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.report_only:
        rows = runs_rows([report_row(c) for c in cells], every, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out_dir / "runs.csv")
    else:
        from fedpers.sweep.ray_cluster import RayClusterError

        try:
            rows = run_grid(out_dir, cells, progress=not args.no_progress, jobs=args.jobs, ray=ray, every=every)
        except RayClusterError as e:  # raised before any cell is submitted
            print(f"error: {e}", file=sys.stderr)
            return 2
    wall = time.perf_counter() - t0
    title = f"{Path(args.grid).name}: {len(cells)} cells"
    chosen, notes = selected_rows(rows, grid_select(args.grid))
    rows = rows + chosen  # each select group's validation-chosen variant, under the group's label
    print(write_table(rows, out_dir / "table.md", title, reference, notes))
    plot(rows, out_dir / "plots")
    from fedpers.sweep.stats import plot as plot_ci

    plot_ci(rows, out_dir / "plots", reference)
    from fedpers.sweep.curves import plot_curves

    plot_curves(rows, out_dir / "plots")  # learning curves per setting, one line per strategy
    axis = parse_axis(read_grid(args.grid).get("axis"))
    if axis is not None:  # regime map: paired differences along the axis, appended to table.md
        from fedpers.sweep.regimes import crossovers, plot_regimes

        lead = reference if isinstance(reference, str) else reference[0]
        plot_regimes(rows, out_dir / "plots", lead, axis["field"])
        extra = crossovers(rows, lead) + crossovers(rows, lead, "unseen")
        if extra:
            with (out_dir / "table.md").open("a") as f:
                f.write("\n" + "\n".join(extra))
    mine = {str(c.out) for c in cells}
    failed = sum(r["status"] != "ok" for r in rows if r["output_dir"] in mine)
    print(f"grid wall time this invocation: {wall:.0f}s; results in {out_dir} (runs.csv, table.md, plots/)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
