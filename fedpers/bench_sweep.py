"""``P7_sweep`` of ``python -m fedpers.bench``: cells per hour of a sweep with ``--jobs`` = cores, divided
by the same sweep with ``--jobs 1``, on one small grid, both measured in this run.

Each sweep is a fresh ``python -m fedpers.sweep`` process (its wall time includes starting Python and its
workers, as a user sees it) whose environment has no ``OMP_NUM_THREADS``, so ``--jobs 1`` gets every core's
torch threads and ``--jobs N`` divides them: the ratio measures running cells side by side against giving
one cell all the threads, not against an artificially single-threaded baseline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fedpers import bench_support as bs
from fedpers.sweep_exec import available_cores

# Cells of a few seconds each on an idle core (digits, 6 clients, 2 rounds), two per worker, so a worker's
# start (imports, ~3 s) is amortised over several cells as in a real grid of minutes-long cells.
GRID = """
base:
  run: {{rounds: {rounds}, num_clients: {clients}, clients_per_round: {per_round}, holdout_clients: 1, unseen_rounds: 1}}
  client.local_epochs: 1
strategies: {strategies}
partitions: {{dir0.5: {{data.partitioner.alpha: 0.5}}}}
seeds: {seeds}
"""


def _sweep(grid: Path, out: Path, jobs: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fedpers.sweep", str(grid), "--output-dir", str(out),
                          "--jobs", str(jobs), "--no-progress"], env=env, capture_output=True, text=True,
                         check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"sweep --jobs {jobs} failed:\n{res.stderr[-3000:]}")
    return wall


def p7_sweep(quick: bool, tmp: Path) -> dict:
    cores = available_cores()
    # --quick: two one-round cells of 4 clients, a smoke run of the machinery, not a measurement.
    strategies = ["fedvpt", "local"] if quick else ["fedvpt", "pfedpg"]
    rounds, clients, n_seeds = (1, 4, 1) if quick else (2, 6, 2 * max(2, cores))
    grid = tmp / "grid.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    grid.write_text(GRID.format(rounds=rounds, clients=clients, per_round=clients - 2, strategies=strategies,
                                seeds=list(range(n_seeds))))
    cells = len(strategies) * n_seeds
    jobs = max(2, cores)  # on one core --jobs 2 still shows what the pool costs
    # --jobs 1 first and last (A-B-A), averaged, so a load that drifts on a shared machine favours neither.
    seq1 = _sweep(grid, tmp / "seq1", 1)
    par = _sweep(grid, tmp / "par", jobs)
    seq2 = seq1 if quick else _sweep(grid, tmp / "seq2", 1)
    seq = (seq1 + seq2) / 2
    per_hour = {"jobs_1": 3600 * cells / seq, f"jobs_{jobs}": 3600 * cells / par}
    return {"ratio": seq / par, "ratio_per_core": seq / par / cores, "cores": cores, "jobs": jobs,
            "cells": cells, "cells_per_hour": per_hour, "wall_s": {"jobs_1": [seq1, seq2], f"jobs_{jobs}": par},
            "rounds_per_cell": rounds, "target": f">= {0.8 * cores:.1f} (0.8 x cores)",
            "load_average_after": bs.load_average(),
            "note": "fresh sweep processes without OMP_NUM_THREADS: --jobs 1 runs one cell at a time with all "
                    "cores' torch threads, --jobs N runs N cells with cores/N threads each"}
