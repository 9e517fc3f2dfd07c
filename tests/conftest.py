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


def text_tiny_overrides(out_dir, adapter: str = "lora", **extra) -> list[str]:
    """The tiny federation on the small synthetic text set and the packaged MiniLM (short sequences)."""
    text = {
        "model.modality": "text",
        "model.backbone": "all-MiniLM-L6-v2",
        "model.adapter": adapter,
        "model.max_length": 16,
        "model.num_prompts": 4,
        "data.dataset": "synthetic_text_small",
        "data.partitioner.name": "iid",
    }
    text.update(extra)
    return tiny_overrides(out_dir, **text)


def copy_app(dest):
    """A copy of the Flower app (what `flwr run` bundles). `flwr run` on it may migrate its
    [tool.flwr.federations] section into $FLWR_HOME/config.toml and comment it out there, as Flower
    >= 1.26 does on a first run; tests run it on a copy so the checkout's pyproject.toml stays as is."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("pyproject.toml", "README.md", "fedpers", "strategies", "experiments/configs"):
        src, dst = root / name, Path(dest) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return Path(dest)
