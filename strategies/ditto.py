"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021).

Global prompts and head are trained by FedAvg. Each client also keeps personal copies
(``personal.prompts``, ``personal.head.*``) trained on its own loss plus (lam / 2) * ||v - w||^2 towards
the global model w it received this round; it is evaluated with the personal copies. The personal copies
start from the first global model the client receives, as in the paper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from strategies._avg import PERSONAL, Averaging, AveragingConfig, as_torch, sq_distance
from strategies._checks import require
from strategies.base import HEAD, register_strategy

SHARED = ("prompts", *HEAD)


@dataclass
class DittoConfig(AveragingConfig):
    name: str = "ditto"
    lam: float = 0.1  # pull of the personal model towards the global one: loss += lam/2 * ||v - w||^2
    personal_epochs: Optional[int] = None  # local epochs on the personal model each round; default client.local_epochs

    def validate(self) -> None:
        super().validate()
        require(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
        require(self.personal_epochs is None or self.personal_epochs >= 1, "personal_epochs",
                f"must be >= 1, got {self.personal_epochs}")


@register_strategy
class Ditto(Averaging):
    name = "ditto"
    summary = "FedAvg global model + personal prompts/head regularised towards it by lam (Ditto)"
    config_cls = DittoConfig
    sends = SHARED
    personal = tuple(PERSONAL + k for k in SHARED)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        c = ctx.cfg.strategy
        w = start_tensors(ctx, received, {})
        fit(ctx, w, list(SHARED), ctx.cfg.client.local_epochs)
        anchor = as_torch(received, SHARED)
        v = as_torch({k: state.get(PERSONAL + k, received[k]) for k in SHARED}, SHARED)
        lam = float(c.lam)
        losses = fit(ctx, v, list(SHARED), c.personal_epochs or ctx.cfg.client.local_epochs,
                     extra_loss=lambda t: 0.5 * lam * sq_distance(t, anchor), salt=1)
        reply, _ = finish(ctx, cls.sends, (), received, w, losses, eval_tensors=v)
        return reply, {PERSONAL + k: v[k].numpy().astype(np.float32).copy() for k in SHARED}
