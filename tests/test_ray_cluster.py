"""A two-node Ray cluster on 127.0.0.1 (a head and a second node, one CPU each), started here with
``ray start`` and torn down here: a sweep through ``--ray-address`` equals the same sweep run locally, and
Flower's simulation engine joins the cluster through ``run.ray_address``.

Teardown kills the process groups this module started (``ray start --block`` keeps every Ray process of
its node in its group), never ``ray stop``: that stops every Ray process of the user on the machine."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120
GRID = """
base:
  run: {rounds: 1, num_clients: 3, clients_per_round: 2, holdout_clients: 1, unseen_rounds: 1}
  data.partitioner.alpha: 1.0
  client.local_epochs: 1
strategies: [fedvpt, pfedpg]
partitions: {dir1.0: {data.partitioner.name: dirichlet}}
seeds: [0, 1]
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


WORKER_PORTS = 40  # size of each node's worker-port range


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_plan(head_flags: list[str], node_flags: list[str]) -> tuple[list[str], list[str]]:
    """Every port both nodes listen on, chosen here and all distinct: Ray's defaults are fixed numbers that
    another Ray on this machine (someone else's cluster, a Flower simulation) may hold, and a worker-port
    range must not contain any other port of either node (Ray refuses to start then)."""
    named = _free_ports(len(head_flags) + len(node_flags))
    taken, ranges = set(named), []
    while len(ranges) < 2:
        lo = _free_ports(1)[0]
        span = range(lo, lo + WORKER_PORTS + 1)
        if span.stop < 65536 and not taken.intersection(span) and all(_bindable(p) for p in span):
            taken.update(span)
            ranges.append(lo)

    def flags(names: list[str], ports: list[int], lo: int) -> list[str]:
        out = [x for flag, p in zip(names, ports, strict=True) for x in (flag, str(p))]
        return out + ["--min-worker-port", str(lo), "--max-worker-port", str(lo + WORKER_PORTS)]

    return (flags(head_flags, named[: len(head_flags)], ranges[0]),
            flags(node_flags, named[len(head_flags):], ranges[1]))


def _env(home: str) -> dict:
    env = dict(os.environ, HOME=home, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def _wait_started(log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group this module created with start_new_session
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the group leader exited; Ray's own children may still be going down
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths live under it
    env = _env(tmp)
    procs = []
    try:
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
        agent = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        head_ports, node_ports = _port_plan(["--port", "--ray-client-server-port", *agent], agent)
        port = int(head_ports[1])  # the head's GCS port, which the second node joins
        head = ["ray", "start", "--head", "--include-dashboard=false", "--temp-dir", f"{tmp}/ray", *common,
                *head_ports]
        worker = ["ray", "start", "--address", f"127.0.0.1:{port}", *common, *node_ports]
        for name, cmd in (("head", head), ("node2", worker)):
            log = Path(tmp) / f"{name}.log"
            procs.append(subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
            _wait_started(log, procs[-1])
        yield {"address": f"127.0.0.1:{port}", "env": env, "tmp": Path(tmp)}
    finally:
        for p in reversed(procs):
            _stop(p)
        subprocess.run(["rm", "-rf", tmp], check=False)


def _rows(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "runs.csv").open()))
    for r in rows:
        r.pop("output_dir"), r.pop("wall_time_s")
    return rows


def _run(args: list[str], env: dict, timeout: float = 420, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_sweep_on_a_two_node_cluster_equals_the_local_sweep(cluster, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    t0 = time.perf_counter()
    # A relative --output-dir: the tasks run in the driver's working directory, so it means the same folder.
    ray_run = _run(["-m", "fedpers.sweep", str(grid), "--output-dir", "ray", "--no-progress",
                    "--ray-address", cluster["address"], "--cell-cpus", "1"], cluster["env"], cwd=tmp_path)
    print(f"4 cells on the 2-node cluster: {time.perf_counter() - t0:.1f} s")
    assert ray_run.returncode == 0, ray_run.stderr[-4000:]
    assert "ran on 2 Ray nodes; 4 wrote into the shared folder" in ray_run.stderr, ray_run.stderr[-4000:]  # the second node took cells too
    local = _run(["-m", "fedpers.sweep", str(grid), "--output-dir", str(tmp_path / "local"), "--no-progress",
                  "--jobs", "1"], cluster["env"])
    assert local.returncode == 0, local.stderr[-4000:]
    rows = _rows(tmp_path / "ray")
    assert [r["status"] for r in rows] == ["ok"] * 4 and rows == _rows(tmp_path / "local")
    for r in rows:
        cell = f"dir1.0/{r['strategy']}/seed{r['seed']}"
        a, b = (json.loads((tmp_path / d / cell / "summary.json").read_text()) for d in ("ray", "local"))
        assert a["final"] == b["final"], cell
    assert not list((tmp_path / "ray").glob(".sweep-driver-*"))  # the driver's marker is gone
    # Resume through the cluster: nothing left to run, nothing submitted.
    again = _run(["-m", "fedpers.sweep", str(grid), "--output-dir", "ray", "--no-progress",
                  "--ray-address", cluster["address"]], cluster["env"], cwd=tmp_path)
    assert again.returncode == 0 and "4 already finished, 0 to run" in again.stderr, again.stderr[-2000:]


PROBE = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
print(json.dumps({
    "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    "jobs": {j["JobID"]: j["DriverPid"] for j in state.jobs()},
    "actors": [[a["JobID"], a["ActorClassName"], a["Address"]["NodeID"]] for a in state.actors().values()],
}))
"""


def test_flower_simulation_joins_the_cluster(cluster, tmp_path):
    out = tmp_path / "flower"
    args = ["-m", "fedpers.simulate", "run.engine=flower", f"run.ray_address={cluster['address']}",
            "run.num_clients=2", "run.clients_per_round=2", "run.rounds=1", "client.local_epochs=1",
            "data.partitioner.alpha=1.0", "run.progress=false", f"run.output_dir={out}"]
    proc = subprocess.Popen([sys.executable, *args], env=cluster["env"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=420)
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and len(summary["final"]["per_client"]) == 2
    # The cluster's own record: the run's process was a driver of this cluster, and its Flower client actors
    # were placed on the cluster's two nodes (one CPU each, one client actor per CPU). A run that started a
    # Ray of its own would leave no job and no actor here. Flower disconnected without shutting the cluster
    # down: this later driver still finds both nodes.
    probe = _run(["-c", PROBE, cluster["address"]], cluster["env"], 120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(seen["nodes"]) == 2, seen
    job = [j for j, pid in seen["jobs"].items() if pid == proc.pid]
    assert len(job) == 1, (proc.pid, seen["jobs"])
    placed = [(cls, node) for j, cls, node in seen["actors"] if j == job[0]]
    assert placed and {node for _, node in placed} == set(seen["nodes"]), (placed, seen["nodes"])
