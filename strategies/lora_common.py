"""Shared pieces of the LoRA strategies: which client tensors are LoRA factors, how the server
initialises them (as peft does), and FedAvg over a set of named tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strategies._checks import require, require_choice
from strategies.base import ClientUpdate, StrategyConfig, weights_of


def lora_a(shapes) -> tuple[str, ...]:
    return tuple(k for k in shapes if k.endswith("lora_A.weight"))


def lora_b(shapes) -> tuple[str, ...]:
    return tuple(k for k in shapes if k.endswith("lora_B.weight"))


def require_lora(shapes, strategy: str) -> None:
    if not lora_a(shapes) or len(lora_a(shapes)) != len(lora_b(shapes)):
        raise ValueError(f"strategy {strategy!r} needs LoRA client tensors (model.modality=text, model.adapter=lora); "
                         f"got {sorted(shapes)[:4]}")


def init_lora(shapes, names, seed: int, salt: int) -> dict[str, np.ndarray]:
    """peft's initialisation (A uniform in +-1/sqrt(in), B zero), seeded by (seed, salt, tensor index)."""
    from fedpers.client import seed_for
    from fedpers.models.text import init_lora_tensor

    out = {}
    for i, k in enumerate(names):
        g = torch.Generator().manual_seed(seed_for(seed, salt, i))
        out[k] = init_lora_tensor(k, tuple(shapes[k]), g).numpy().astype(np.float32)
    return out


@dataclass
class LoraAvgConfig(StrategyConfig):
    server_lr: float = 1.0  # shared factors += server_lr * weighted mean of client deltas
    weighting: str = "num_examples"  # num_examples | uniform

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.weighting, "weighting", ("num_examples", "uniform"))


class SharedTensors:
    """Global tensors updated FedAvg-style from client deltas."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = {k: np.asarray(v, dtype=np.float32).copy() for k, v in tensors.items()}

    def send(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.tensors.items()}

    def apply(self, updates: list[ClientUpdate], weighting: str, server_lr: float) -> dict[str, float]:
        w = weights_of(updates, weighting)
        sq = 0.0
        for k in self.tensors:
            mean = sum(wi * u.deltas[k].astype(np.float64) for wi, u in zip(w, updates))
            self.tensors[k] = (self.tensors[k] + server_lr * mean).astype(np.float32)
            sq += float((mean ** 2).sum())
        return {"delta_norm": sq ** 0.5}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.tensors.items()}

    def load_state_dict(self, state) -> None:
        missing = set(self.tensors) - set(state)
        if missing:
            raise ValueError(f"state lacks tensors {sorted(missing)[:3]}")
        self.tensors = {k: np.asarray(state[k], dtype=np.float32).copy() for k in self.tensors}
