"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): FedAvg of prompts
and head with a proximal term (mu / 2) * ||w - w_global||^2 in every client's local loss. With mu = 0 it
is FedAvg (a test pins this)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._avg import Averaging, AveragingConfig, as_torch, sq_distance
from strategies._checks import require
from strategies.base import HEAD, register_strategy
from strategies.fedavg import global_model_update


@dataclass
class FedProxConfig(AveragingConfig):
    name: str = "fedprox"
    mu: float = 0.01  # proximal coefficient: local loss += mu/2 * ||w - w_global||^2 (0 = FedAvg)

    def validate(self) -> None:
        super().validate()
        require(self.mu >= 0, "mu", f"must be >= 0, got {self.mu}")


@register_strategy
class FedProx(Averaging):
    name = "fedprox"
    summary = "FedAvg of prompts and head with a proximal term mu (FedProx)"
    config_cls = FedProxConfig
    sends = ("prompts", *HEAD)
    personal = ()

    @classmethod
    def client_update(cls, ctx, received, state):
        anchor = as_torch(received, cls.sends)
        mu = float(ctx.cfg.strategy.mu)
        # Always computed (also for mu = 0), so the mu = 0 == FedAvg test exercises this code path.
        return global_model_update(ctx, received, state, cls.sends,
                                   extra_loss=lambda t: 0.5 * mu * sq_distance(t, anchor))
