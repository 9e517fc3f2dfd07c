"""``flwr run .`` from a fresh clone: pyproject.toml's local-simulation federation, with HOME in a temp dir."""

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import copy_app
from tests.test_deployment import free_port

ROOT = Path(__file__).resolve().parents[1]


def _own_processes(marker: str) -> list[int]:
    """Pids of the processes this test started: their command line holds its temp HOME or its port."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def _federations(text: str) -> dict:
    """[tool.flwr.federations] of pyproject.toml, or, after Flower's one-time migration of connections
    to $FLWR_HOME/config.toml commented it out, the commented block (what `git checkout` restores)."""
    flwr = tomllib.loads(text)["tool"]["flwr"]
    if "federations" in flwr:
        return flwr["federations"]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("# ").startswith("[tool.flwr.federations]"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#") and line.strip():
            break
        block.append(line.lstrip("#").strip())
    return tomllib.loads("\n".join(block))["tool"]["flwr"]["federations"]


def test_federations_block_is_read_after_flowers_migration_too(tmp_path):
    from flwr.cli.config_migration import _comment_out_legacy_toml_config

    text = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text)
    _comment_out_legacy_toml_config(tmp_path)  # what the first `flwr run` does to the app's pyproject.toml
    migrated = (tmp_path / "pyproject.toml").read_text()
    assert "federations" not in tomllib.loads(migrated)["tool"]["flwr"]
    assert _federations(migrated) == _federations(text)


def test_pyproject_declares_a_local_simulation_federation_for_every_default_client():
    from fedpers.config import RunConfig

    fed = _federations((ROOT / "pyproject.toml").read_text())
    local = fed[fed["default"]]
    assert local["address"] == ":local:"  # Flower's managed local SuperLink, in simulation mode
    # One virtual SuperNode per client: the ServerApp needs every partition-id of run.num_clients.
    assert local["options"]["num-supernodes"] == RunConfig().num_clients


@pytest.mark.slow  # Ray and a local SuperLink start, 10 clients: one to three minutes on 2 cores
def test_flwr_run_dot_works_from_a_clone(tmp_path):
    clone = copy_app(tmp_path / "clone")
    home, out = tmp_path / "home", tmp_path / "results"
    control, http = free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "PYTHONPATH": str(ROOT),
           # the README's setting: reuse this environment, no `uv sync` of the app's dependencies per run
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    env.pop("FLWR_HOME")  # Flower's default, ~/.flwr, under the temp HOME
    flwr = Path(sys.executable).parent / "flwr"
    overrides = f"run.rounds=1 client.local_epochs=1 run.progress=false run.output_dir={out}"
    try:
        proc = subprocess.run([str(flwr), "run", ".", "--stream", "--run-config", f'overrides="{overrides}"'],
                              cwd=clone, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        # The detached local SuperLink (its log file is under the temp HOME) and its simulation runtime.
        for pid in set(_own_processes(str(home))) | set(_own_processes(f"127.0.0.1:{http}")):
            os.kill(pid, signal.SIGTERM)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["num_clients"] == 10 and summary["failures"] == 0
    # the results folder simulate writes: the partition report of the simulated federation included
    assert json.loads((out / "partitions" / "partitions.json").read_text())["num_clients"] == 10
    # Flower moved the connection into the user's Flower config, as its default.
    conns = tomllib.loads((home / ".flwr" / "config.toml").read_text())["superlink"]
    assert conns["default"] == "local-simulation"
    assert conns["local-simulation"]["options"]["num-supernodes"] == 10
    assert "federations" not in tomllib.loads((clone / "pyproject.toml").read_text())["tool"]["flwr"]


def test_flwr_runs_without_an_output_dir_each_get_their_own_folder():
    from fedpers.experiment import load_config
    from fedpers.flower.apps import per_run_output_dir

    a, b = load_config(None, []), load_config(None, [])
    per_run_output_dir(a, 17)
    per_run_output_dir(b, 18)
    assert a.run.output_dir != b.run.output_dir and a.run.output_dir.endswith("flwr-run-17")
    mine = load_config(None, ["run.output_dir=results/mine"])
    per_run_output_dir(mine, 19)
    assert mine.run.output_dir == "results/mine"


def test_flowers_runtime_install_pins_what_pip_pins():
    """`flwr run` resolves the app's dependencies with uv: [tool.uv] constraint-dependencies must hold
    every pin of constraints.txt (a drift would give `flwr run` another torch than the README install)."""
    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = sorted(p.replace(" ", "") for p in pins if p)
    uv = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["constraint-dependencies"]
    assert sorted(u.replace(" ", "") for u in uv) == pins
