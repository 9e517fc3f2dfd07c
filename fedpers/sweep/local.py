"""How a sweep's cells run: one after the other here, in local worker processes (``--jobs``), or as Ray
tasks on an existing cluster (``--ray-address``, see :mod:`fedpers.sweep.ray_cluster`).

Every executor runs the same function on a cell (:func:`fedpers.sweep.cells.run_cell`: the cell's resolved config as YAML in,
``(status, error)`` out) and writes into the cell's own folder, so the rows, ``runs.csv`` and
``table.md`` are built by the driver from the ``summary.json`` files exactly as for a sequential sweep.
A cell that raises is recorded as failed with its error and the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from fedpers.rounds.workers import sigterm_raises, watch_parent
from fedpers.sweep.cells import is_done, row_of, run_cell, runs_rows

log = logging.getLogger("fedpers")

def available_cores() -> int:
    """CPUs this process may run on (the affinity mask: a Slurm or cgroup allocation, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` concurrent cells: the cores divided among them, never more than
    an explicit ``OMP_NUM_THREADS`` (a user or a scheduler that set it asked for that many per process)."""
    n = max(1, available_cores() // max(1, jobs))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) >= 1:
        n = min(n, int(cap))
    return n


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if parent_pid is not None:
        watch_parent(parent_pid)


CellFn = Callable[[str], tuple[str, str]]
Done = Callable[[int, str, str], None]  # (cell index, status, error)


def run_sequential(jobs: list[tuple[int, str]], done: Done, cell_fn: CellFn = run_cell) -> None:
    """In this process, with all the cores' threads (within ``OMP_NUM_THREADS``), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(1))
    try:
        for i, cfg_yaml in jobs:
            done(i, *cell_fn(cfg_yaml))
    finally:
        torch.set_num_threads(before)


def run_local(jobs: list[tuple[int, str]], n_workers: int, done: Done, cell_fn: CellFn = run_cell) -> None:
    """``n_workers`` spawned processes, each with ``threads_per_job(n_workers)`` torch threads; a worker
    process runs many cells, so the backbone and data caches of a process are reused across them.

    A worker that dies (killed for memory, a segfault) breaks the whole pool, and the pool cannot say
    which cell killed it: every cell it still held goes into a fresh pool once more, and a cell caught in
    a second breakage then runs alone in its own process, where a death is its own and is recorded."""
    threads = threads_per_job(n_workers)
    log.warning("sweep: %d worker processes x %d torch threads", n_workers, threads)
    ctx = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads and locks
    broken_before: set[int] = set()
    pending = list(jobs)
    with sigterm_raises():
        while pending:
            crashed = _pool_pass(pending, n_workers, threads, ctx, done, cell_fn)
            pending = [(i, y) for i, y in crashed if i not in broken_before]
            for i, y in crashed:
                if i in broken_before:
                    _solo(i, y, threads, ctx, done, cell_fn)
            broken_before.update(i for i, _ in crashed)
            if crashed:
                log.warning("sweep: a worker process died; %d cells go to a fresh pool", len(pending))


def _pool_pass(work, n_workers, threads, ctx, done: Done, cell_fn: CellFn) -> list[tuple[int, str]]:
    """One pool over ``work``; returns the cells lost to a broken pool."""
    pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, os.getpid()))
    crashed = []
    try:
        futures = {pool.submit(cell_fn, y): (i, y) for i, y in work}
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                i, y = futures.pop(f)
                try:
                    status, error = f.result()
                except BrokenProcessPool:
                    crashed.append((i, y))
                    continue
                done(i, status, error)
    except BaseException:  # Ctrl-C or a failing driver: stop the running cells instead of waiting for them
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            p.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return crashed


def _solo(i: int, y: str, threads: int, ctx, done: Done, cell_fn: CellFn) -> None:
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=(threads, os.getpid()))
    try:
        status, error = pool.submit(cell_fn, y).result()
    except BrokenProcessPool:
        status, error = "failed", "its worker process died, also when the cell ran alone (out of memory?)"
    finally:
        pool.shutdown(wait=True)
    done(i, status, error)


def run_grid(out_dir: Path, cells: list, progress: bool = True, jobs: int | None = None,
             ray: dict | None = None, cell_fn: CellFn = run_cell, every: list | None = None) -> list[dict]:
    """Run the unfinished cells and return the rows of runs.csv: one per cell, and one per other finished
    cell of ``out_dir`` (``every``: the whole grid, when ``cells`` is a selection of it; see
    :func:`fedpers.sweep.cells.runs_rows`). ``jobs``: local worker processes (None = one per core); ``ray``:
    ``{"address", "cpus", "gpus"}`` runs them on a Ray cluster. A finished cell whose config differs is
    run again: the caller has refused that unless asked (``--rerun-changed``)."""
    from fedpers.config import to_yaml
    from fedpers.sweep.report import write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    mine = {str(c.out) for c in cells}
    # The other finished cells of the folder: read once, listed in every runs.csv this run writes.
    extra = [r for r in runs_rows([], every or [], out_dir) if r["output_dir"] not in mine]

    def csv_rows() -> list[dict]:
        return runs_rows([rows[k] for k in sorted(rows)] + extra, [], None)

    rows: dict[int, dict] = {}
    todo = []
    for i, cell in enumerate(cells):
        if is_done(cell):
            rows[i] = row_of(cell, "ok")
        else:
            todo.append(i)
    log.warning("grid: %d cells, %d already finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    for i in todo:
        (cells[i].out / "summary.json").unlink(missing_ok=True)  # a stale summary must not mark a rerun done
    bar = _bar(len(todo), progress)

    def done(i: int, status: str, error: str) -> None:
        cell = cells[i]
        if status != "ok":
            log.error("cell %s/%s/seed%s failed: %s", cell.partition, cell.strategy, cell.seed, error)
        rows[i] = row_of(cell, status, error)
        write_csv(csv_rows(), out_dir / "runs.csv")
        if bar is not None:
            bar.set_postfix_str(f"{cell.partition}/{cell.strategy}/seed{cell.seed} {status}")
            bar.update(1)

    work = [(i, to_yaml(cells[i].cfg)) for i in todo]
    try:
        if not work:
            pass
        elif ray is not None:
            from fedpers.sweep.ray_cluster import run_ray

            run_ray(work, {i: cells[i].out for i in todo}, out_dir, done, **ray)
        else:
            n = min(jobs or available_cores(), len(work))
            if n <= 1:
                run_sequential(work, done, cell_fn)
            else:
                run_local(work, n, done, cell_fn)
    finally:
        if bar is not None:
            bar.close()
    ordered = csv_rows()
    write_csv(ordered, out_dir / "runs.csv")
    return ordered


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="grid", unit="cell", dynamic_ncols=True)
