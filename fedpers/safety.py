"""Checks that run before any work (results folder, memory) and after the last round (the outcome).

The config validator (``fedpers.experiment.validate``) checks values on their own; these checks look at the
machine and the results folder, so they run only where a run starts (``simulate.run``, the deployed
ServerApp), never in a ClientApp that merely parses the config the server sent.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fedpers.config import ConfigError, ExperimentConfig

# Files whose presence means the folder holds (part of) a run: a fresh run would replace them.
RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl")


class RunFailed(RuntimeError):
    """The run finished but produced nothing usable (no round applied, or non-finite final metrics)."""


def holds_run(out: Path) -> list[str]:
    """The run files ``out`` holds (an empty metrics.jsonl, left by a run stopped before round 1, is none)."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if p.is_file() and (name != "metrics.jsonl" or p.stat().st_size > 0):
            found.append(name)
    return found


def claim_output_dir(cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Make sure ``run.output_dir`` is a writable folder this run may write into.

    A folder that already holds a run is refused unless the user said what to do with it:
    ``run.resume=true`` continues it, ``run.overwrite=true`` (or ``overwrite``, for callers such as the
    sweep that own their folders) replaces it, and then the old checkpoint and summary are removed so
    they can never be mistaken for this run's."""
    # Resolved before any check: ``RUN/x/..`` (no ``x`` yet) or a symlink is the folder it names.
    out = Path(cfg.run.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError("run.output_dir", f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError("run.output_dir", f"{out} is not a writable folder: {e.strerror or e}") from None
    found = holds_run(out)
    if not found or cfg.run.resume:
        return
    if not (cfg.run.overwrite or overwrite):
        raise ConfigError("run.output_dir", f"{out} already holds a run ({', '.join(found)}); set "
                                            f"run.resume=true to continue it, run.overwrite=true to replace it, "
                                            f"or choose another run.output_dir")
    for name in ("checkpoint.pt", "summary.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "client_state", ignore_errors=True)  # the Flower simulation's per-node states


def memory_lower_bound_bytes(cfg: ExperimentConfig) -> int:
    """A lower bound of the memory one run needs: one client's trained tensors with their gradients
    and momentum, every client's private head, and one example's activations through the backbone
    (one (tokens x width) tensor per block, one (tokens x tokens) attention map). Real use is higher;
    the point is that a typo (``model.num_prompts=2000000``) is refused in a second instead of
    allocating gigabytes a minute later."""
    from fedpers.client import client_tensor_shapes
    from fedpers.data.catalog import get_dataset_info

    m = cfg.model
    num_classes = get_dataset_info(cfg.data.dataset).num_classes
    if m.modality in ("text", "llm"):
        from fedpers.models.backbones import load_model

        length = m.llm.context_tokens + m.llm.target_tokens if m.modality == "llm" else m.max_length
        dim, depth, tokens = load_model(m).embed_dim, 1, length + m.num_prompts
    else:
        dim, depth, patches = _vit_dims(m.backbone, m.img_size)
        tokens = 1 + m.num_prompts + patches
    shapes = client_tensor_shapes(cfg, num_classes, dim)
    per_client = sum(int(np.prod(s, dtype=np.float64)) for s in shapes.values())
    head = 0 if m.modality == "llm" else num_classes * (dim + 1)  # an LLM client has no head
    floats = 3 * per_client + cfg.run.num_clients * head + depth * tokens * dim + tokens * tokens
    return int(4 * floats)


def _vit_dims(backbone: str, img_size: int | None) -> tuple[int, int, int]:
    import timm
    import torch

    from fedpers.models.prompted import BackboneError

    if not timm.is_model(backbone):
        raise BackboneError(f"model.backbone: {backbone!r} is not a timm model name (see timm.list_models('vit*'))")
    extra = {"img_size": img_size} if img_size is not None else {}
    with torch.device("meta"):  # shapes only, no weights allocated
        vit = timm.create_model(backbone, pretrained=False, num_classes=0, **extra)
    return int(vit.embed_dim), len(getattr(vit, "blocks", ())), int(vit.patch_embed.num_patches)


def check_memory(cfg: ExperimentConfig) -> None:
    need = memory_lower_bound_bytes(cfg) / 2**30
    if need > cfg.run.max_memory_gb:
        raise ConfigError("run.max_memory_gb", f"this config needs at least {need:.1f} GB of tensors and "
                                               f"activations, over run.max_memory_gb={cfg.run.max_memory_gb} "
                                               f"(check model.num_prompts, model.img_size, run.num_clients); "
                                               f"raise the limit if it is meant")


def check_outcome(summary: dict) -> None:
    """A run that changed nothing, or whose final metrics are not numbers, must not look like a result."""
    if summary.get("rounds_applied", 0) == 0:
        raise RunFailed(f"no round was applied to the server state in {summary.get('rounds', 0)} rounds "
                        f"(every round had too few valid replies or was rolled back; see metrics.jsonl)")
    final = summary.get("final", {})
    bad = [k for k in ("accuracy_mean", "accuracy_std", "accuracy_worst10")
           if not isinstance(final.get(k), (int, float)) or not math.isfinite(final[k])]
    if bad:
        raise RunFailed(f"final metrics are not finite ({', '.join(f'{k}={final.get(k)}' for k in bad)})")
