"""Atomic checkpoints of the server side of a run, and resuming from them.

``<output_dir>/checkpoint.pt`` holds everything the round loop needs to continue as if it had never
stopped: the strategy state (generator *and* optimizer moments), the last finished round, the ledger
rows so far, the global RNG states (python, numpy, torch) and, when the transport can export them, the
clients' personal states (the in-process engine can; a Flower engine cannot reach into its nodes).

Writes go to a temporary file that is fsync'ed and then renamed over the old checkpoint, so a run
killed at any instant leaves either the previous checkpoint or the new one, never a torn file.

The file is a pickle (``torch.save``): load only checkpoints you wrote yourself.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpers.config import ExperimentConfig, to_dict

FORMAT_VERSION = 1
FILENAME = "checkpoint.pt"
# Fields that may differ between the interrupted run and its resumption: they do not change what is
# computed (more rounds just continue the same schedule; client sampling is stateless per round).
RESUMABLE_CHANGES = ("run.rounds", "run.resume", "run.progress", "run.checkpoint_every", "run.client_timeout_s")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that belongs to a different experiment."""


def checkpoint_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run.output_dir) / FILENAME


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def seed_globals(seed: int) -> None:
    """Fresh runs start the global RNGs from run.seed, so even code that (wrongly) draws from them is
    reproducible, and a resumed run's RNG states match an uninterrupted one's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_checkpoint(cfg: ExperimentConfig, server_round: int, strategy, ledger, transport=None,
                    extra: dict | None = None) -> Path:
    """Atomically write the state after ``server_round`` finished."""
    state = {
        "format": FORMAT_VERSION,
        "round": server_round,
        "config": to_dict(cfg),
        "strategy": strategy.state_dict(),
        "ledger": ledger.state_dict(),
        "rng": rng_states(),
        "clients": transport.state_dict() if hasattr(transport, "state_dict") else None,
        "extra": extra or {},
    }
    path = checkpoint_path(cfg)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk, or a power cut can bring back the old name.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms that cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(cfg: ExperimentConfig) -> dict:
    """Read the checkpoint of ``cfg.run.output_dir`` and check it belongs to this experiment."""
    path = checkpoint_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"run.resume=true but there is no checkpoint at {path} (run.output_dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {FORMAT_VERSION}")
    diffs = config_differences(state["config"], to_dict(cfg))
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs[:5])
        raise CheckpointError(f"{path} was written by a different experiment ({shown}); only "
                              f"{', '.join(RESUMABLE_CHANGES)} may change on resume")
    if state["round"] > cfg.run.rounds:
        raise CheckpointError(f"{path} is at round {state['round']}, beyond run.rounds={cfg.run.rounds}")
    return state


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif dataclasses.is_dataclass(a) or dataclasses.is_dataclass(b):
            out += config_differences(_as_dict(a), _as_dict(b), name + ".")
        elif a != b and name not in RESUMABLE_CHANGES:
            out.append((name, a, b))
    return out


def _as_dict(x: Any) -> dict:
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else dict(x or {})


def restore(state: dict, strategy, transport=None) -> None:
    """Put strategy, client states and RNGs back as they were after ``state['round']``."""
    strategy.load_state_dict(state["strategy"])
    if state.get("clients") is not None and hasattr(transport, "load_state_dict"):
        transport.load_state_dict(state["clients"])
    set_rng_states(state["rng"])
