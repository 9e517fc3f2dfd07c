"""Launch the fedpers apps on Flower's simulation engine (the one place that calls run_simulation).

Why ``run_simulation``, which Flower 1.41 marks deprecated: its replacement, ``flwr run`` against a
local SuperLink (pyproject.toml's local-simulation federation; tested), runs the ServerApp in another
process, so ``python -m fedpers.simulate`` could neither hand it a validated config object nor get the
summary back, nor fail with the run's exit code. 1.41 has no other public in-process launcher.

Without ``-v`` the console shows fedpers' progress bar and round lines only: Flower's logger (which
resets itself to DEBUG when imported), its deprecation notice, Ray's FutureWarning and the Ray actors'
logs are kept back. ``-v`` shows all of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import warnings

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


def run_flower_simulation(cfg: ExperimentConfig, verbose: bool = False) -> dict:
    for k, v in FLOWER_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from flwr.simulation import run_simulation

    backend = backend_config(cfg)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
        backend["init_args"] = {**backend.get("init_args", {}), "logging_level": "ERROR", "log_to_driver": False}

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
            backend_config=backend,
            verbose_logging=verbose,
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
