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


def backend_config(cfg: ExperimentConfig) -> dict:
    """Flower's Ray backend settings: each client's resources and, with ``run.ray_address``, the existing
    cluster to join (the backend passes ``init_args`` to ``ray.init``; on an existing cluster Ray refuses
    num_cpus/num_gpus there, so only the address goes in, and shutting down only disconnects)."""
    r = cfg.run
    out: dict = {"client_resources": {"num_cpus": r.num_cpus_per_client, "num_gpus": r.num_gpus_per_client}}
    if r.ray_address is not None:
        out["init_args"] = {"address": r.ray_address}
    return out


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
            backend_config=backend_config(cfg),
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
