"""``P7_sweep`` of ``python -m fedpers.bench``: cells per hour of a sweep with ``--jobs`` = cores, divided
by the same sweep with ``--jobs 1``, on one small grid, both measured in this run.

Each sweep is a fresh ``python -m fedpers.sweep`` process (its wall time includes starting Python and its
workers, as a user sees it) with this environment. Run it with ``OMP_NUM_THREADS`` unset on an idle machine:
then ``--jobs 1`` gets every core's torch threads and ``--jobs N`` divides them, and the ratio measures
running cells side by side against giving one cell all the threads. The value of ``OMP_NUM_THREADS`` (a cap
for both) is recorded with the figures.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from fedpers.bench import support as bs
from fedpers.sweep.local import available_cores

# Cells of about ten seconds on an idle core (digits, 10 clients, 3 rounds), two per worker: a worker's
# start (imports: ~3 s idle, 15 s on a loaded machine) is paid once per worker, while a sequential sweep pays
# it once in all, so with cells of a few seconds the pool's start dominates. A real grid's cells take minutes.
GRID = """
base:
  run: {{rounds: {rounds}, num_clients: {clients}, clients_per_round: {per_round}, holdout_clients: 1, unseen_rounds: 1}}
  client.local_epochs: 1
strategies: {strategies}
partitions: {{dir0.5: {{data.partitioner.alpha: 0.5}}}}
seeds: {seeds}
"""


def _sweep(grid: Path, out: Path, jobs: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the sweep and all its worker processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fedpers.sweep", str(grid), "--output-dir", str(out),
                          "--jobs", str(jobs), "--no-progress"], env=dict(os.environ), capture_output=True,
                         text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers were waited for by the sweep: included
    if res.returncode != 0:
        raise RuntimeError(f"sweep --jobs {jobs} failed:\n{res.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _autogroup() -> bool | None:
    # With Linux autogroup scheduling a busy machine gives each session one fair share, however many
    # processes it runs: there, more --jobs cannot raise a sweep's CPU share, and the ratio stays near 1.
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def p7_sweep(quick: bool, tmp: Path) -> dict:
    cores = available_cores()
    # --quick: two one-round cells of 4 clients, a smoke run of the machinery, not a measurement.
    strategies = ["fedvpt", "local"] if quick else ["fedvpt", "pfedpg"]
    rounds, clients, n_seeds = (1, 4, 1) if quick else (3, 10, max(2, cores))
    grid = tmp / "grid.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    grid.write_text(GRID.format(rounds=rounds, clients=clients, per_round=clients - 2, strategies=strategies,
                                seeds=list(range(n_seeds))))
    cells = len(strategies) * n_seeds
    jobs = max(2, cores)  # on one core --jobs 2 still shows what the pool costs
    # --jobs 1 first and last (A-B-A), averaged, so a load that drifts on a shared machine favours neither.
    (seq1, cpu1), (par, cpu_par) = _sweep(grid, tmp / "seq1", 1), _sweep(grid, tmp / "par", jobs)
    seq2, cpu2 = (seq1, cpu1) if quick else _sweep(grid, tmp / "seq2", 1)
    seq, cpu_seq = (seq1 + seq2) / 2, (cpu1 + cpu2) / 2
    per_hour = {"jobs_1": 3600 * cells / seq, f"jobs_{jobs}": 3600 * cells / par}
    return {"ratio": seq / par, "ratio_per_core": seq / par / cores, "cores": cores, "jobs": jobs,
            "cells": cells, "cells_per_hour": per_hour, "wall_s": {"jobs_1": [seq1, seq2], f"jobs_{jobs}": par},
            # CPU seconds per cell: what the pool costs in work (its workers' imports), whatever the load
            "cpu_s_per_cell": {"jobs_1": cpu_seq / cells, f"jobs_{jobs}": cpu_par / cells},
            "cpu_utilisation": {"jobs_1": cpu_seq / seq, f"jobs_{jobs}": cpu_par / par},
            "sched_autogroup": _autogroup(),
            "rounds_per_cell": rounds, "target": f">= {0.8 * cores:.1f} (0.8 x cores)",
            "load_average_after": bs.load_average(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "note": "fresh sweep processes; with OMP_NUM_THREADS unset --jobs 1 runs one cell at a time with all "
                    "cores' torch threads and --jobs N runs N cells with cores/N threads each; with it set, both "
                    "are capped by it (on a shared, oversubscribed machine, several spinning OpenMP threads per "
                    "cell are far slower than one, so measure there with OMP_NUM_THREADS=1). cpu_utilisation = "
                    "CPU seconds / wall seconds: near jobs on an idle machine; on a busy one with "
                    "sched_autogroup the sweep's session gets one share, whatever its process count"}
