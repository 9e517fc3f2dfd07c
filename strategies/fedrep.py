"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated Learning",
ICML 2021): each round a client first fits its personal head with the received shared representation
frozen, then updates the representation (here: the prompts) with its head frozen. Only the prompts are
averaged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from strategies._avg import Averaging, AveragingConfig
from strategies._checks import require
from strategies.base import HEAD, register_strategy


@dataclass
class FedRepConfig(AveragingConfig):
    name: str = "fedrep"
    head_epochs: int = 2  # local epochs on the personal head (prompts frozen), first
    body_epochs: Optional[int] = None  # local epochs on the prompts (head frozen), second; default client.local_epochs

    def validate(self) -> None:
        super().validate()
        require(self.head_epochs >= 1, "head_epochs", f"must be >= 1, got {self.head_epochs}")
        require(self.body_epochs is None or self.body_epochs >= 1, "body_epochs", f"must be >= 1, got {self.body_epochs}")


@register_strategy
class FedRep(Averaging):
    name = "fedrep"
    summary = "shared prompts, personal head; head epochs then prompt epochs each round (FedRep)"
    config_cls = FedRepConfig
    sends = ("prompts",)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        c = ctx.cfg.strategy
        tensors = start_tensors(ctx, received, state)
        losses = fit(ctx, tensors, list(HEAD), c.head_epochs, salt=1)
        losses += fit(ctx, tensors, ["prompts"], c.body_epochs or ctx.cfg.client.local_epochs, salt=2)
        return finish(ctx, cls.sends, cls.personal, received, tensors, losses)
