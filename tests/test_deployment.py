"""A real Flower deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication, two registered
SuperNodes reading their own exported data folders, one unregistered SuperNode that must be refused,
a short pFedPG run launched with ``flwr run`` (through fedpers.flower.launch), a failing run, and a
dead SuperLink. Every process started here is killed in ``finally``, with all its descendants.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpers import simulate
from fedpers.experiment import load_config
from fedpers.export_partitions import export
from tests.conftest import assert_same_client_losses, copy_app, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Processes:
    """Start processes in their own sessions; stop them and every descendant, whatever happened."""

    def __init__(self, env, log_dir: Path):
        self.env, self.log_dir, self.procs, self.logs = env, log_dir, {}, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115  (closed in stop_all)
        self.logs.append(log)
        # One FLWR_HOME per process, as on separate machines: Flower installs the app bundle into
        # $FLWR_HOME/apps without a lock, and two nodes unpacking into one folder at once can race.
        env = {**self.env, "FLWR_HOME": str(self.log_dir / f"flwr-home-{name}")}
        p = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        import psutil

        family = []
        for p in self.procs.values():
            try:
                family += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for proc in alive:  # SuperExec children run in sessions of their own: kill them one by one
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for log in self.logs:
            log.close()


def flwr_json(env, *args, timeout=60) -> dict:
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    return json.loads(out.stdout[out.stdout.find("{"):])


def launch(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedpers.flower.launch", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, check=False)


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen")
def test_tls_authenticated_deployment_matches_simulation(tmp_path):
    t_start = time.perf_counter()
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("FEDPERS_FAULTS", None)
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)], check=True, timeout=120,
                   capture_output=True)
    for i in range(3):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / f"node{i}")],
                       check=True, timeout=30)
    out = tmp_path / "deployed"
    overrides = tiny_overrides(out, **{"run.num_clients": 2, "run.clients_per_round": 2, "run.rounds": 2,
                                       "run.client_timeout_s": 120})
    export(load_config(None, overrides), tmp_path / "data")
    port = free_port()
    (home / ".flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedpers-test"\n\n[superlink.fedpers-test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    pyproject_before = (REPO / "pyproject.toml").read_text()
    app = copy_app(tmp_path / "app")  # flwr run migrates its local-simulation federation, in the copy
    procs = Processes(env, tmp_path)
    try:
        link = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation"])
        wait_for_port(port, link, 60)
        for i in (0, 1):
            reg = flwr_json(env, "supernode", "register", str(tmp_path / f"node{i}.pub"), "fedpers-test")
            assert reg.get("success"), reg

        def supernode(i: int, extra: list[str]):
            return procs.start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(tmp_path / f"node{i}"),
                "--host", "127.0.0.1", "--port", str(free_port()), *extra])

        for i in (0, 1):
            supernode(i, ["--node-config", f'partition-id={i} num-partitions=2 data-path="{tmp_path / "data" / f"client_{i}"}"',
                          "--max-wait-time", "120"])
        rogue = supernode(2, ["--node-config", "partition-id=1 num-partitions=2", "--max-retries", "2",
                              "--max-wait-time", "20"])

        t_run = time.perf_counter()
        done = launch(env, "fedpers-test", "--app", str(app), "--timeout", "240", "--poll", "1", *overrides)
        run_s = time.perf_counter() - t_run
        assert done.returncode == 0, done.stderr[-3000:]
        status = json.loads(done.stdout)
        assert status["status"] == "finished:completed"
        listed = flwr_json(env, "ls", "fedpers-test", "--run-id", str(status["run-id"]))
        assert listed["runs"][0]["status"] == "finished:completed"

        # The unregistered node was refused: it gave up with an error and never joined.
        assert rogue.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in procs.log("supernode2")
        nodes = flwr_json(env, "supernode", "ls", "fedpers-test")["nodes"]
        assert len(nodes) == 2 and all(n["status"] == "online" for n in nodes), nodes

        # A run that fails on the server side is reported as such, with a non-zero exit.
        t_bad = time.perf_counter()
        bad = launch(env, "fedpers-test", "--app", str(app), "--timeout", "120", "--poll", "1", "--no-check",
                     "run.rounds=0")
        assert bad.returncode == 1 and "finished:failed" in bad.stderr, (bad.returncode, bad.stderr[-2000:])
        bad_s = time.perf_counter() - t_bad
    finally:
        procs.stop_all()
    assert (REPO / "pyproject.toml").read_text() == pyproject_before, "a test let flwr run rewrite pyproject.toml"

    # A dead SuperLink: bounded, non-zero, says so.
    t_dead = time.perf_counter()
    dead = launch(env, "fedpers-test", "--app", str(app), "--timeout", "30", *overrides, timeout=120)
    assert dead.returncode == 1 and "SuperLink" in dead.stderr and "unavailable" in dead.stderr
    dead_s = time.perf_counter() - t_dead

    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 2 and summary["failures"] == 0 and all(r["num_ok"] == 2 for r in rows)

    # Same seed, same data (exported folders), same code path: the in-process simulation agrees.
    sim = tmp_path / "simulated"
    assert simulate.main([o for o in overrides if not o.startswith("run.output_dir=")]
                         + [f"run.output_dir={sim}"]) == 0
    a = summary["final"]["per_client"]
    b = json.loads((sim / "summary.json").read_text())["final"]["per_client"]
    assert_same_client_losses(out, sim)  # every client's losses, every round, not a few test images' accuracy
    print(f"deployment test: run {run_s:.1f}s, failing run {bad_s:.1f}s, dead SuperLink {dead_s:.1f}s, total {time.perf_counter() - t_start:.1f}s, per-client {a} vs {b}")


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_llm_round_over_tls_supernodes_matches_the_fast_engine(tmp_path):
    """One round of LoRA on the tiny random Llama (tests/llm_helpers.py, chitchat speakers) through a TLS
    SuperLink and two real SuperNodes, each training its speaker of the simulated federation (no
    data-path): every speaker's reply loss (test and train) equals the fast engine's on the same config
    within 1e-4, as in the Flower simulation engine's LLM test."""
    from tests.llm_helpers import llm_tiny_overrides, tiny_llm_folder

    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("FEDPERS_FAULTS", None)
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)], check=True, timeout=120,
                   capture_output=True)
    tiny_llm_folder()  # written once here; the SuperNodes load it by its path in the config
    out = tmp_path / "deployed"
    overrides = llm_tiny_overrides(out, "lora", **{"strategy.name": "fedit", "run.num_clients": 2,
                                                   "run.clients_per_round": 2, "run.rounds": 1,
                                                   "client.optimizer": "adamw", "run.client_timeout_s": 240})
    port = free_port()
    (home / ".flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedpers-test"\n\n[superlink.fedpers-test]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    app = copy_app(tmp_path / "app")
    procs = Processes(env, tmp_path)
    try:
        link = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--disable-runtime-dependency-installation"])
        wait_for_port(port, link, 60)
        for i in (0, 1):
            procs.start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"), "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions=2", "--max-wait-time", "240"])
        done = launch(env, "fedpers-test", "--app", str(app), "--timeout", "400", "--poll", "1", *overrides,
                      timeout=500)
        metrics = (out / "metrics.jsonl").read_text()[-2000:] if (out / "metrics.jsonl").exists() else ""
        assert done.returncode == 0, (done.stderr[-2000:], metrics, procs.log("supernode0")[-3000:])
        assert json.loads(done.stdout)["status"] == "finished:completed"
    finally:
        procs.stop_all()

    deployed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fast_out = tmp_path / "fast"
    assert simulate.main([o for o in overrides if not o.startswith(("run.output_dir=", "run.engine="))]
                         + ["run.engine=fast", f"run.output_dir={fast_out}"]) == 0
    fast = [json.loads(line) for line in (fast_out / "metrics.jsonl").read_text().splitlines()]
    assert len(deployed) == len(fast) == 1
    a, b = deployed[0], fast[0]
    assert a["num_failed"] == 0 and a["clients"].keys() == b["clients"].keys() == {"0", "1"}
    for k in a["clients"]:
        for m in ("test_loss", "train_loss"):
            assert math.isfinite(a["clients"][k][m])
            assert abs(a["clients"][k][m] - b["clients"][k][m]) < 1e-4, (k, m, a["clients"][k], b["clients"][k])
