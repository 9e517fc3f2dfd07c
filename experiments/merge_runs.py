"""Merge a grid's ``runs.csv`` with the rows of later re-runs, and write the merged table and plots.

    python experiments/merge_runs.py experiments/benchmark_results/benchmark_full/runs.csv \
        experiments/benchmark_results/benchmark_v2/runs.csv --out experiments/benchmark_results/benchmark_merged

Rows are keyed by (partition, strategy, seed); a row of a later file replaces the same cell's row of an
earlier one, so a re-run of the strategies whose code changed updates exactly those cells. The merged
``runs.csv``, ``table.md`` (pivots; CI and paired-difference sections for the cells whose ``summary.json``
is still on disk) and ``plots/`` are written to ``--out``. Order: the first file's, new cells appended.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fedpers.sweep.report import COLUMNS, plot, write_csv, write_table

NUMERIC = {"accuracy_mean", "accuracy_worst10", "unseen_accuracy_mean", "cross_eval_gap", "params_per_round",
           "bytes_per_round", "local_steps", "rounds", "wall_time_s"}


def read_rows(path: Path) -> list[dict]:
    rows = []
    for r in csv.DictReader(path.open()):
        rows.append({c: (float(r[c]) if c in NUMERIC and r.get(c) not in (None, "") else r.get(c, ""))
                     for c in COLUMNS})
    return rows


def merge(files: list[Path]) -> list[dict]:
    merged: dict[tuple[str, str, str], dict] = {}
    for f in files:
        for r in read_rows(f):
            merged[(r["partition"], r["strategy"], str(r["seed"]))] = r  # later files win; dicts keep first order
    return list(merged.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/merge_runs.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="runs.csv files, earliest first")
    ap.add_argument("--out", type=Path, required=True, help="folder for the merged runs.csv, table.md, plots/")
    ap.add_argument("--title", default="Merged sweep", help="title of table.md")
    ap.add_argument("--reference", default="pfedpg", help="strategy label the paired differences are taken to")
    args = ap.parse_args(argv)
    rows = merge(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "runs.csv")
    write_table(rows, args.out / "table.md", args.title, args.reference)
    plot(rows, args.out / "plots")
    from fedpers.sweep.stats import plot as plot_ci  # CI bars and paired differences, as the sweep draws them

    plot_ci(rows, args.out / "plots", args.reference)
    print(f"{len(rows)} cells -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
