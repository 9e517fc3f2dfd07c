"""Pieces shared by the LoRA strategies that change the frozen weight itself (FedEx-LoRA, FLoRA) or
mix two adapters (FedDPA): the per-module dense *fold* tensor, LoRA products and scaling.

A fold tensor ``<module>.fold.weight`` (out x in) is added to the module's frozen weight W0 for one
forward pass (``fedpers.models.text``): the frozen backbone is shared by every simulated client in a
process and is never mutated, so "merge this update into W0" becomes "the server keeps the merged
update and every client adds it to W0". On the wire the fold is in LoRA units (without peft's scaling
``s = model.lora.alpha / model.lora.r``); the client multiplies by ``s`` before the forward pass, so the
server never needs the model config.
"""

from __future__ import annotations

import numpy as np
import torch

from strategies.lora_common import lora_a, lora_b

FOLD = ".fold.weight"


def modules(shapes) -> list[str]:
    """The LoRA-wrapped modules, in the order of their A factors."""
    return [k.rsplit(".lora_", 1)[0] for k in lora_a(shapes)]


def a_of(module: str) -> str:
    return module + ".lora_A.weight"


def b_of(module: str) -> str:
    return module + ".lora_B.weight"


def fold_of(module: str) -> str:
    return module + FOLD


def fold_shapes(shapes) -> dict[str, tuple[int, int]]:
    """out x in for every wrapped module (B is out x r, A is r x in)."""
    return {fold_of(m): (shapes[b_of(m)][0], shapes[a_of(m)][1]) for m in modules(shapes)}


def product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    return b.astype(np.float64) @ a.astype(np.float64)


def lora_scaling(cfg) -> float:
    """peft's LoRA scaling for this run's model (``lora_alpha / r``)."""
    return float(cfg.model.lora.alpha) / float(cfg.model.lora.r)


def add_folds(ctx, tensors: dict[str, torch.Tensor], received: dict[str, np.ndarray]) -> None:
    """Put the received folds (LoRA units) into ``tensors`` as model weights (times the scaling)."""
    s = lora_scaling(ctx.cfg)
    for k, v in received.items():
        if k.endswith(FOLD):
            tensors[k] = torch.from_numpy(np.asarray(v, dtype=np.float32)) * s


def truncate(name: str, a, r: int):
    """First ``r`` ranks of a factor (rows of A, columns of B)."""
    return a[:r] if name.endswith("lora_A.weight") else a[:, :r]


def pad(name: str, a: np.ndarray, full: tuple[int, ...]) -> np.ndarray:
    """A rank-r factor zero-padded to the model's rank: zero rows of A / columns of B get zero gradient,
    so the padded model is exactly the rank-r LoRA."""
    out = np.zeros(full, dtype=np.float32)
    if name.endswith("lora_A.weight"):
        out[: a.shape[0]] = a
    else:
        out[:, : a.shape[1]] = a
    return out


def factor_names(shapes) -> tuple[str, ...]:
    return lora_a(shapes) + lora_b(shapes)
