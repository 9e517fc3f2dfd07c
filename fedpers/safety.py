"""Checks that run before any work (memory; the results folder: :mod:`fedpers.results.run_folder`) and
after the last round (the outcome).

The config validator (``fedpers.experiment.validate``) checks values on their own; these checks look at the
machine and the results folder, so they run only where a run starts (``simulate.run``, the deployed
ServerApp), never in a ClientApp that merely parses the config the server sent.
"""

from __future__ import annotations

import math

from fedpers.config import ConfigError, ExperimentConfig


class RunFailed(RuntimeError):
    """The run finished but produced nothing usable (no round applied, or non-finite final metrics)."""


def memory_lower_bound_bytes(cfg: ExperimentConfig) -> int:
    """A lower bound of the memory one run needs: one client's trained tensors with their gradients
    and momentum and the tensors the strategy broadcasts to it, every client's private head, the
    strategy's server state (generator, bases, optimizer moments: ``Strategy.server_state_numel``,
    computed from shapes) and one example's activations through the backbone (one (tokens x width)
    tensor per block, one (tokens x tokens) attention map). Real use is higher; the point is that a typo
    (``model.num_prompts=2000000``, ``strategy.basis_size=100000000``) is refused in a second instead of
    allocating gigabytes a minute later."""
    from fedpers.client import client_tensor_shapes
    from fedpers.data.catalog import get_dataset_info
    from strategies import get_strategy_class
    from strategies.base import numel

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
    per_client = numel(shapes.values())
    head = 0 if m.modality == "llm" else num_classes * (dim + 1)  # an LLM client has no head
    scls, n = get_strategy_class(cfg.strategy.name), cfg.run.num_clients
    server = scls.server_state_numel(cfg.strategy, num_clients=n, shapes=shapes)
    broadcast = numel(scls.broadcast_shapes(cfg.strategy, num_clients=n, shapes=shapes).values())
    floats = 3 * per_client + broadcast + n * head + server + depth * tokens * dim + tokens * tokens
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
                                               f"(check model.num_prompts, model.img_size, run.num_clients and the "
                                               f"strategy's sizes, e.g. strategy.basis_size or strategy.hidden_dim); "
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
