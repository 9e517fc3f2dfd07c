"""Test environment: offline hub, no Flower telemetry, HOME/FLWR_HOME in a temp dir."""

import os
import tempfile

_home = tempfile.mkdtemp(prefix="fedpers-test-home-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_HOME": os.path.join(_home, ".flwr"),
    "HOME": _home,
    "MPLBACKEND": "Agg",
})


import pytest  # noqa: E402


def tiny_overrides(out_dir, **extra) -> list[str]:
    """A small, fast federation on the default data and backbone (dotlist overrides)."""
    base = {
        "run.num_clients": 3,
        "run.clients_per_round": 3,
        "run.rounds": 2,
        "run.engine": "inprocess",
        "run.progress": "false",
        "run.output_dir": str(out_dir),
        "data.partitioner.alpha": 1.0,
        "client.local_epochs": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_cfg(tmp_path):
    from fedpers.config import load_config

    def make(**extra):
        return load_config(None, tiny_overrides(tmp_path / "out", **extra))

    return make
