"""Sweep cells in local worker processes (--jobs), failures, crashes, flags, and shipping results back."""

import csv
import json
from pathlib import Path

import pytest

from fedpers.config import ConfigError
from fedpers.experiment import load_config
from fedpers.sweep import cli as sweep
from fedpers.sweep import local as sweep_exec
from fedpers.sweep import ray_cluster as sweep_ray

SMALL = """
base:
  run: {rounds: 1, num_clients: 3, clients_per_round: 2, holdout_clients: 1, unseen_rounds: 1}
  data.partitioner.alpha: 1.0
  client.local_epochs: 1
partitions:
  dir1.0: {data.partitioner.name: dirichlet}
"""


def grid(tmp_path: Path, strategies: str, seeds: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(SMALL + f"strategies: {strategies}\nseeds: {seeds}\n")
    return path


def rows_of(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "runs.csv").open()))
    for r in rows:  # where and how long differ between two runs of the same cell; nothing else may
        r.pop("output_dir"), r.pop("wall_time_s")
    return rows


@pytest.mark.slow
def test_jobs_equal_sequential_and_a_failing_cell_does_not_stop_the_others(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    g = grid(tmp_path, f"[pfedpg, {{broken: {{strategy.name: fedvpt, model.checkpoint: {garbage}}}}}]", "[0, 1]")
    assert sweep.main([str(g), "--output-dir", str(tmp_path / "seq"), "--jobs", "1", "--no-progress"]) == 1
    # The worker run is also a resume, so one pool of workers (each importing torch and timm anew) serves
    # both: seed 0 runs first in this process (one cell finishes, one fails), then the whole grid with
    # --jobs 2 must skip the finished cell and run the failed one again beside the two never run.
    par_out = tmp_path / "par"
    assert sweep.main([str(g), "--output-dir", str(par_out), "--jobs", "1", "--no-progress", "--seeds", "0"]) == 1
    marker = par_out / "dir1.0/pfedpg/seed0/summary.json"
    before = marker.stat().st_mtime_ns
    assert not (par_out / "dir1.0/broken").exists()  # refused before any work: no folder left behind
    assert sweep.main([str(g), "--output-dir", str(par_out), "--jobs", "2", "--no-progress"]) == 1
    assert marker.stat().st_mtime_ns == before  # finished: skipped
    seq, par = rows_of(tmp_path / "seq"), rows_of(tmp_path / "par")
    # Grid order, whatever order the workers finished in; the broken cells failed (again) with their reason.
    assert [(r["strategy"], r["seed"]) for r in par] == [(s, k) for s in ("pfedpg", "broken") for k in "01"]
    assert [r["status"] for r in par] == ["ok"] * 2 + ["failed"] * 2
    # the weights file is no safetensors file: named before any work, in the cell's row
    assert all(r["error"].startswith("ConfigError") and str(garbage) in r["error"] and "not a safetensors file"
               in r["error"] for r in par[2:])
    assert par == seq  # pfedpg seed 1 and both broken cells ran in the workers
    finals = {}
    for cell in ("pfedpg/seed0", "pfedpg/seed1"):
        a, b = (json.loads((tmp_path / d / "dir1.0" / cell / "summary.json").read_text()) for d in ("seq", "par"))
        assert a["final"] == b["final"], cell  # every client's accuracy, not just the means in runs.csv
        finals[cell] = a["final"]["per_client"]
    assert finals["pfedpg/seed0"] != finals["pfedpg/seed1"]  # the seeds did differ: cells were not mixed up


@pytest.mark.slow
def test_a_worker_that_dies_fails_only_its_own_cell(tmp_path):
    g = grid(tmp_path, "[fedvpt, {crash: {strategy.name: fedvpt}}]", "[0]")
    out, cells = sweep.load_grid(g, output_dir=str(tmp_path / "out"))
    from tests.sweep_helpers import crash_or_run

    rows = sweep_exec.run_grid(out, cells, progress=False, jobs=2, cell_fn=crash_or_run)
    assert [(r["strategy"], r["status"]) for r in rows] == [("fedvpt", "ok"), ("crash", "failed")]
    assert "died" in rows[1]["error"] and "alone" in rows[1]["error"]


def test_threads_divide_the_cores_within_omp_num_threads(monkeypatch):
    monkeypatch.setattr(sweep_exec, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [sweep_exec.threads_per_job(j) for j in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert [sweep_exec.threads_per_job(j) for j in (1, 2, 4)] == [3, 3, 2]


@pytest.mark.parametrize("flags, field", [
    (["--jobs", "0"], "--jobs"),
    (["--cell-cpus", "2"], "--cell-cpus"),
    (["--cell-gpus", "1"], "--cell-gpus"),
    (["--ray-address", "auto", "--jobs", "2"], "--jobs"),
    (["--ray-address", "auto", "--cell-cpus", "0"], "--cell-cpus"),
    (["--ray-address", "auto", "--cell-gpus", "-1"], "--cell-gpus"),
    (["--ray-address", " "], "--ray-address"),
])
def test_bad_execution_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, field):
    g = grid(tmp_path, "[fedvpt]", "[0]")
    assert sweep.main([str(g), "--output-dir", str(tmp_path / "out"), *flags]) == 2
    assert f"'{field}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # caught before any work


def test_flower_backend_config_carries_cluster_and_client_resources(tmp_path):
    from fedpers.flower.simulation import backend_config

    cfg = load_config(None, ["run.engine=flower", "run.num_cpus_per_client=2", "run.num_gpus_per_client=0.5",
                             "run.ray_address=10.0.0.1:6379", f"run.output_dir={tmp_path}"])
    assert backend_config(cfg) == {"client_resources": {"num_cpus": 2.0, "num_gpus": 0.5},
                                   "init_args": {"address": "10.0.0.1:6379"}}
    local = load_config(None, ["run.engine=flower", f"run.output_dir={tmp_path}"])
    assert "init_args" not in backend_config(local)  # no address: Flower starts its own local Ray
    for bad, field in ((["run.engine=fast", "run.ray_address=auto"], "run.ray_address"),
                       (["run.engine=fast", "run.num_gpus_per_client=1"], "run.num_gpus_per_client"),
                       (["run.engine=flower", "run.num_gpus_per_client=-1"], "run.num_gpus_per_client")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, bad)


def test_results_ship_back_when_the_worker_cannot_see_the_driver_folder(tmp_path):
    """What a Ray task does, called here without Ray: no marker visible -> the folder is packed and removed
    on the worker side, and unpacking it on the driver side gives a finished cell; marker visible -> in place."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"x")
    g = grid(tmp_path, f"[fedvpt, {{broken: {{strategy.name: fedvpt, model.checkpoint: {garbage}}}}}]", "[0]")
    _, (ok, broken) = sweep.load_grid(g, output_dir=str(tmp_path / "out"))
    from fedpers.config import to_yaml

    status, error, blob, _ = sweep_ray._cell_task(to_yaml(ok.cfg), str(ok.out), str(tmp_path / "no-marker"), 1,
                                                  str(tmp_path))
    assert (status, error) == ("ok", "") and blob and not ok.out.exists()
    sweep_ray.unpack(blob, ok.out)
    assert sweep.is_done(ok) and sweep.row_of(ok, "ok")["accuracy_mean"] > 0
    marker = tmp_path / "marker"
    marker.touch()
    status, error, blob, _ = sweep_ray._cell_task(to_yaml(broken.cfg), str(broken.out), str(marker), 1, str(tmp_path))
    assert status == "failed" and "model.checkpoint" in error and blob is None and not broken.out.exists()


def test_a_cell_too_big_for_every_node_is_refused_before_submitting():
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    sweep_ray.check_fits(nodes, 4, 0)
    with pytest.raises(sweep_ray.RayClusterError, match="--cell-cpus=8"):
        sweep_ray.check_fits(nodes, 8, 0)
    with pytest.raises(sweep_ray.RayClusterError, match="--cell-gpus=1"):
        sweep_ray.check_fits(nodes, 1, 1)
