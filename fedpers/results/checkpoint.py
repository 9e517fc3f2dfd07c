"""Atomic checkpoints of the server side of a run, and resuming from them.

``<output_dir>/checkpoint.pt`` holds everything the round loop needs to continue as if it had never
stopped: the strategy state (generator *and* optimizer moments), the last finished round, the ledger
rows so far, the global RNG states (python, numpy, torch) and, when the transport can export them, the
clients' personal states (the in-process engine can; a Flower engine cannot reach into its nodes).

Writes go to a temporary file that is fsync'ed and then renamed over the old checkpoint, so a run
killed at any instant leaves either the previous checkpoint or the new one, never a torn file.

Loading a checkpoint runs no code: it is read with ``torch.load(weights_only=True)``, whose unpickler
only rebuilds tensors and plain containers. NumPy arrays (client states, the NumPy RNG state) are stored
as raw bytes plus dtype and shape (:func:`encode`), because unpickling an ``ndarray`` would need the
general unpickler. A file that is not such a checkpoint is a :class:`CheckpointError`, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpers.config import ExperimentConfig, to_dict

# 2: weights_only-loadable (arrays as tagged bytes); 1 was a general pickle and is refused unread.
FORMAT_VERSION = 2
FILENAME = "checkpoint.pt"
# Fields that may differ between the interrupted run and its resumption: they do not change what is
# computed (more rounds just continue the same schedule; client sampling is stateless per round; a
# results folder may be moved or renamed between the two).
RESUMABLE_CHANGES = ("run.rounds", "run.resume", "run.progress", "run.checkpoint_every", "run.client_timeout_s",
                     "run.output_dir", "run.overwrite", "run.max_memory_gb")
_ND = "__ndarray__"  # tag of an encoded NumPy array (or NumPy scalar, with "scalar": True)


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
    state = encode({
        "format": FORMAT_VERSION,
        "round": server_round,
        "config": to_dict(cfg),
        "strategy": strategy.state_dict(),
        "ledger": ledger.state_dict(),
        "rng": rng_states(),
        "clients": transport.state_dict() if hasattr(transport, "state_dict") else None,
        "extra": extra or {},
    })
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


def encode(obj: Any) -> Any:
    """``obj`` with every NumPy array/scalar replaced by a tagged dict of a uint8 tensor, so that the
    whole state loads with ``weights_only=True``. Anything else must already be a tensor, a plain
    container or a primitive; other objects are refused here, at save time, not at resume."""
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.asarray(obj)
        if a.dtype.hasobject:
            raise TypeError("checkpoint: object arrays cannot be stored")
        raw = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8).copy()
        return {_ND: a.dtype.str, "shape": list(a.shape), "scalar": isinstance(obj, np.generic),
                "data": torch.from_numpy(raw)}
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(encode(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} (only tensors, arrays and plain data)")


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if _ND in obj:
            data = obj["data"]
            if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
                raise ValueError("an encoded array whose data is not a uint8 tensor")
            dtype = np.dtype(obj[_ND])
            if dtype.hasobject:
                raise ValueError("an encoded array of dtype object")
            a = np.frombuffer(data.numpy().tobytes(), dtype=dtype).reshape(obj["shape"])
            return a[()] if obj.get("scalar") else a.copy()
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode(v) for v in obj)
    return obj


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (no code runs) and decode it. Raises CheckpointError for a file
    that is unreadable, foreign, of another format version or incomplete."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: a general pickle, maybe hostile
        raise CheckpointError(f"{path} is not a fedpers checkpoint that can be loaded safely (it needs the "
                              f"general unpickler, which can run code; an older fedpers or another program "
                              f"wrote it): {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, a directory...: all unreadable
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: not a fedpers checkpoint of format {FORMAT_VERSION} (found {found!r})")
    missing = sorted({"round", "config", "strategy", "ledger", "rng"} - set(raw))
    if missing or not isinstance(raw["round"], int) or not isinstance(raw["config"], dict):
        raise CheckpointError(f"{path}: incomplete checkpoint (missing or malformed: {missing or ['round/config']})")
    try:
        return decode(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt array in checkpoint: {e}") from None


def load_checkpoint(cfg: ExperimentConfig) -> dict:
    """Read the checkpoint of ``cfg.run.output_dir`` and check it belongs to this experiment."""
    path = checkpoint_path(cfg)
    if not path.is_file():
        raise CheckpointError(f"run.resume=true but there is no checkpoint at {path} (run.output_dir)")
    state = read_checkpoint(path)
    diffs = config_differences(with_defaults(state["config"]), to_dict(cfg))
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs[:5])
        raise CheckpointError(f"{path} was written by a different experiment ({shown}); only "
                              f"{', '.join(RESUMABLE_CHANGES)} may change on resume")
    if state["round"] > cfg.run.rounds:
        raise CheckpointError(f"{path} is at round {state['round']}, beyond run.rounds={cfg.run.rounds}")
    return state


def with_defaults(old: dict) -> dict:
    """A checkpoint's config with the fields added to fedpers since it was written at their defaults, as a
    finished sweep cell's config.yaml is read: a new config field does not orphan every checkpoint. A config
    that no longer validates is compared as it is."""
    from fedpers.config import ConfigError
    from fedpers.experiment import from_layers

    try:
        return to_dict(from_layers([old]))
    except (ConfigError, TypeError, ValueError, KeyError):
        return old


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
    try:
        strategy.load_state_dict(state["strategy"])
        if state.get("clients") is not None and hasattr(transport, "load_state_dict"):
            transport.load_state_dict(state["clients"])
        set_rng_states(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        # The config matched, so the file is damaged or hand-edited: say so instead of a traceback.
        raise CheckpointError(f"checkpoint of {strategy.name!r} does not fit this run: "
                              f"{type(e).__name__}: {e}") from None
