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
import warnings

from fedpers.config import ExperimentConfig

FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def run_flower_simulation(cfg: ExperimentConfig, verbose: bool = False) -> dict:
    for k, v in FLOWER_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from flwr.simulation import run_simulation

    backend_config = {"client_resources": {"num_cpus": cfg.run.num_cpus_per_client, "num_gpus": 0.0}}
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
        backend_config["init_args"] = {"logging_level": "ERROR", "log_to_driver": False}

    from fedpers.flower.apps import FlowerRunError, client_app, make_server_app

    result: dict = {}
    run_simulation(
        server_app=make_server_app(cfg, result),
        client_app=client_app,
        num_supernodes=cfg.run.num_clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if "error" in result:
        raise FlowerRunError(f"the server app failed: {result['error']!r}") from result["error"]
    if "summary" not in result:
        raise FlowerRunError("the Flower simulation ended without a result (see the log above)")
    return result["summary"]
