"""FedVPT: one global set of visual prompts, averaged FedAvg-style; heads stay personal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies._checks import require, require_choice
from strategies.base import ClientUpdate, Strategy, StrategyConfig, register_strategy, weights_of


@dataclass
class FedVPTConfig(StrategyConfig):
    name: str = "fedvpt"
    server_lr: float = 1.0  # global prompts += server_lr * weighted mean of client deltas
    weighting: str = "num_examples"  # num_examples | uniform

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.weighting, "weighting", ("num_examples", "uniform"))


@register_strategy
class FedVPT(Strategy):
    name = "fedvpt"
    summary = "FedAvg of shared visual prompts, personal heads (VPT + FedAvg)"
    config_cls = FedVPTConfig
    sends = ("prompts",)

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        rng = np.random.default_rng([seed, 0xF5])
        self.prompts = (rng.standard_normal(shapes["prompts"]) * init_std).astype(np.float32)

    def configure(self, server_round, partition_ids):
        return {pid: {"prompts": self.prompts.copy()} for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        w = weights_of(updates, self.config.weighting)
        mean_delta = sum(wi * u.deltas["prompts"].astype(np.float64) for wi, u in zip(w, updates))
        self.prompts = (self.prompts + self.config.server_lr * mean_delta).astype(np.float32)
        return {"delta_norm": float(np.linalg.norm(mean_delta))}

    def state_dict(self):
        return {"prompts": self.prompts.copy()}

    def load_state_dict(self, state):
        self.prompts = np.asarray(state["prompts"], dtype=np.float32).copy()
