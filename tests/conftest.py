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
