"""Federated LoRA baselines on a frozen language model (heads stay personal in all of them):

- ``fedit``: FedAvg of both LoRA factors (FedIT, Zhang et al. 2024, "Towards building the federated GPT");
- ``ffa_lora``: A frozen at its (shared, seeded) initialisation, only B trained and averaged
  (FFA-LoRA, Sun et al., ICLR 2024), halving communication and making the average exact;
- ``fedsa_lora``: A shared and averaged, B personal (FedSA-LoRA, Guo et al., ICLR 2025: A learns
  general knowledge, B client-specific knowledge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strategies.base import HEAD, ClientUpdate, Strategy, register_strategy
from strategies.lora_common import LoraAvgConfig, SharedTensors, init_lora, lora_a, lora_b, require_lora

FFA_A_SALT = 0xFFA  # ffa_lora's frozen A: one seeded draw shared by server and every client


class _LoraAvg(Strategy):
    """FedAvg over the LoRA factors this strategy sends."""

    modalities = ("text", "llm")
    adapters = ("lora",)

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        require_lora(shapes, self.name)
        self.shared = SharedTensors(init_lora(shapes, self.sends, seed, 0x10A))

    def configure(self, server_round, partition_ids):
        return {pid: self.shared.send() for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        return self.shared.apply(updates, self.config.weighting, self.config.server_lr)

    def state_dict(self):
        return {"shared": self.shared.state_dict()}

    def load_state_dict(self, state):
        self.shared.load_state_dict(state["shared"])


@dataclass
class FedITConfig(LoraAvgConfig):
    name: str = "fedit"


@register_strategy
class FedIT(_LoraAvg):
    name = "fedit"
    summary = "FedAvg of LoRA A and B on a frozen language model, personal heads (FedIT)"
    config_cls = FedITConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return lora_a(shapes) + lora_b(shapes), HEAD


@dataclass
class FFALoraConfig(LoraAvgConfig):
    name: str = "ffa_lora"


@register_strategy
class FFALora(_LoraAvg):
    name = "ffa_lora"
    summary = "LoRA with A frozen at a shared seeded init; only B trained and averaged (FFA-LoRA)"
    config_cls = FFALoraConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return lora_b(shapes), HEAD

    @classmethod
    def frozen_a(cls, shapes, seed: int) -> dict[str, np.ndarray]:
        return init_lora(shapes, lora_a(shapes), seed, FFA_A_SALT)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        tensors = start_tensors(ctx, received, state)
        # A never travels: every client rebuilds the same frozen draw from the run seed.
        for k, v in cls.frozen_a(ctx.shapes, ctx.cfg.run.seed).items():
            tensors[k] = torch.from_numpy(v)
        trainable = [k for k in tensors if k not in lora_a(ctx.shapes)]
        losses = fit(ctx, tensors, trainable, ctx.cfg.client.local_epochs)
        sends, personal = cls.tensor_roles(ctx.shapes)
        return finish(ctx, sends, personal, received, tensors, losses)


@dataclass
class FedSALoraConfig(LoraAvgConfig):
    name: str = "fedsa_lora"


@register_strategy
class FedSALora(_LoraAvg):
    name = "fedsa_lora"
    summary = "LoRA A shared and averaged, LoRA B and head personal (FedSA-LoRA)"
    config_cls = FedSALoraConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return lora_a(shapes), lora_b(shapes) + HEAD


@dataclass
class FedProxLoraConfig(LoraAvgConfig):
    name: str = "fedprox_lora"
    mu: float = 0.01  # weight of the proximal term (mu / 2) * ||LoRA - received LoRA||^2

    def validate(self) -> None:
        super().validate()
        from strategies._checks import require

        require(self.mu >= 0, "mu", f"must be >= 0, got {self.mu}")


@register_strategy
class FedProxLora(FedIT):
    """FedIT whose clients minimise FedProx's local objective (Li et al., MLSys 2020, eq. 2),
    ``F_k(w) + mu/2 ||w - w^t||^2``, with w the LoRA factors and w^t the factors received this round."""

    name = "fedprox_lora"
    summary = "FedIT with FedProx's proximal term on the LoRA factors (FedProx on LoRA)"
    config_cls = FedProxLoraConfig

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        tensors = start_tensors(ctx, received, state)
        anchor = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in received.items()}
        mu = ctx.cfg.strategy.mu

        def prox(t):
            return 0.5 * mu * sum(((t[k] - anchor[k]) ** 2).sum() for k in anchor)

        losses = fit(ctx, tensors, list(tensors), ctx.cfg.client.local_epochs, extra_loss=prox)
        sends, personal = cls.tensor_roles(ctx.shapes)
        return finish(ctx, sends, personal, received, tensors, losses)
