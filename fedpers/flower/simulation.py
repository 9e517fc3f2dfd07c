"""Launch the fedpers apps on Flower's simulation engine (the one place that calls run_simulation)."""

from __future__ import annotations

import os
from pathlib import Path

from fedpers.config import ExperimentConfig

FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def run_flower_simulation(cfg: ExperimentConfig) -> dict:
    for k, v in FLOWER_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from flwr.simulation import run_simulation

    from fedpers.flower.apps import FlowerRunError, client_app, make_server_app
    from fedpers.flower.node_state import SIM_ENV

    result: dict = {}
    # Virtual nodes have no node config of their own: their personal-state folder comes through the
    # environment, which the simulation's workers inherit.
    previous = os.environ.get(SIM_ENV)
    os.environ[SIM_ENV] = str(Path(cfg.run.output_dir).resolve() / "client_state")
    try:
        run_simulation(
            server_app=make_server_app(cfg, result),
            client_app=client_app,
            num_supernodes=cfg.run.num_clients,
            backend_config={"client_resources": {"num_cpus": cfg.run.num_cpus_per_client, "num_gpus": 0.0}},
        )
    finally:
        if previous is None:
            os.environ.pop(SIM_ENV, None)
        else:
            os.environ[SIM_ENV] = previous
    if "error" in result:
        raise FlowerRunError(f"the server app failed: {result['error']!r}") from result["error"]
    if "summary" not in result:
        raise FlowerRunError("the Flower simulation ended without a result (see the log above)")
    return result["summary"]
