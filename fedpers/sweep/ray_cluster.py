"""A sweep's cells as Ray tasks on an existing cluster (``python -m fedpers.sweep GRID --ray-address A``).

Each cell is one task that reserves ``--cell-cpus`` CPUs (its torch threads) and ``--cell-gpus`` GPUs and
runs :func:`fedpers.sweep.cells.run_cell` on the node Ray picks, in the driver's working directory.
Results land in the cell's folder under its absolute path, which works with or without a shared file
system:

- shared (NFS, a Slurm cluster's home or scratch, one machine): the task writes the folder in place;
- not shared: the task writes the same path on its node's disk, then packs the folder, deletes its copy
  and returns the bytes; the driver unpacks them into the same path here.

The task tells the two apart by looking for a marker file the driver wrote into the grid folder before
submitting (a fresh name per invocation). Either way the driver then builds rows, ``runs.csv`` and
``table.md`` from ``summary.json`` as for a local sweep, and a cell finished before an interruption is
skipped on the next invocation.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import uuid
from pathlib import Path

log = logging.getLogger("fedpers")


class RayClusterError(RuntimeError):
    """The cluster cannot be reached, or no node can ever hold one cell's resources."""


def _cell_task(cfg_yaml: str, out: str, marker: str, threads: int, cwd: str) -> tuple[str, str, bytes | None, str]:
    """Runs on a Ray worker: the cell, then its folder shipped back unless the driver can already see it.

    The cell runs in the driver's working directory (created if this node lacks it), so a relative
    ``run.output_dir`` means the same folder as on the driver, and the config the cell saves is the one the
    driver compares against to skip finished cells."""
    import torch

    from fedpers.sweep.cells import run_cell

    torch.set_num_threads(threads)
    before = os.getcwd()
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    try:
        status, error = run_cell(cfg_yaml)
    finally:
        os.chdir(before)  # Ray reuses worker processes for later tasks
    blob = None
    folder = Path(out)
    if not Path(marker).exists() and folder.is_dir():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(folder, arcname=".")
        blob = buf.getvalue()
        shutil.rmtree(folder, ignore_errors=True)  # the driver owns the results; no stray copies on workers
    return status, error, blob, socket.gethostname()


def _ray_cell_task(*args) -> tuple[str, str, bytes | None, str]:
    import ray

    status, error, blob, host = _cell_task(*args)
    return status, error, blob, f"{host}/{ray.get_runtime_context().get_node_id()[:12]}"


def unpack(blob: bytes, out: Path) -> None:
    """Replace ``out`` by the folder a worker shipped back (unpacked beside it, then renamed)."""
    tmp = out.with_name(out.name + f".incoming-{uuid.uuid4().hex[:8]}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(tmp, filter="data")  # "data": no absolute paths, links out of the folder or devices
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def _runtime_env(threads: int) -> dict:
    # Workers inherit the environment of their `ray start`, not this driver's: PYTHONPATH (a checkout that
    # is not pip-installed on the nodes) and the thread cap travel explicitly.
    env = {"OMP_NUM_THREADS": str(threads)}
    for key in ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "FLWR_TELEMETRY_ENABLED"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {"env_vars": env}


def check_fits(nodes: list[dict], cpus: float, gpus: float) -> None:
    """Fail before submitting when no alive node could ever run one cell (Ray would wait forever)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if not alive:
        raise RayClusterError("the Ray cluster has no alive node")
    if not any(r.get("CPU", 0) >= cpus for r in alive):
        raise RayClusterError(f"--cell-cpus={cpus:g}: no node has that many CPUs (largest: "
                              f"{max(r.get('CPU', 0) for r in alive):g})")
    if gpus > 0 and not any(r.get("GPU", 0) >= gpus for r in alive):
        raise RayClusterError(f"--cell-gpus={gpus:g}: no node has that many GPUs (largest: "
                              f"{max(r.get('GPU', 0) for r in alive):g})")


def run_ray(work: list[tuple[int, str]], outs: dict[int, Path], out_dir: Path, done, address: str,
            cpus: float = 1.0, gpus: float = 0.0) -> None:
    """Submit every cell, then record each as its task finishes (in completion order)."""
    import ray

    threads = max(1, int(cpus))
    try:
        ray.init(address=address, runtime_env=_runtime_env(threads), logging_level=logging.WARNING,
                 log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayClusterError(f"cannot connect to the Ray cluster at --ray-address={address}: {e}") from e
    marker = out_dir.resolve() / f".sweep-driver-{uuid.uuid4().hex}"
    try:
        check_fits(ray.nodes(), cpus, gpus)
        marker.write_text("written by the sweep driver; a Ray task that sees it writes results in place\n")
        # A node lost mid-cell makes Ray run the task again elsewhere; an exception in the cell does not
        # (run_cell catches it and reports it as the cell's error).
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(_ray_cell_task)
        cwd = os.getcwd()
        refs = {task.remote(y, str(outs[i].resolve()), str(marker), threads, cwd): i for i, y in work}
        log.warning("sweep: %d cells submitted to the Ray cluster (%g CPUs, %g GPUs each)", len(refs), cpus, gpus)
        nodes, shipped = set(), 0
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                i = refs.pop(ref)
                try:
                    status, error, blob, host = ray.get(ref)
                except ray.exceptions.RayError as e:  # the task died (its node lost more than max_retries times)
                    done(i, "failed", f"Ray task failed: {type(e).__name__}: {e}")
                    continue
                if blob is not None:
                    unpack(blob, outs[i])
                    shipped += 1
                nodes.add(host)
                done(i, status, error)
        log.warning("sweep: the cells ran on %d Ray nodes; %d wrote into the shared folder, %d were shipped back",
                    len(nodes), len(work) - shipped, shipped)
    finally:
        marker.unlink(missing_ok=True)
        ray.shutdown()
