"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021).

Global prompts and head are trained by FedAvg. Each client also keeps personal copies
(``personal.prompts``, ``personal.head.*``) trained on its own loss plus (lam / 2) * ||v - w||^2 towards
the global model w it received this round (Algorithm 1: the personal step is
``v <- v - eta * (grad F_k(v) + lam * (v - w^t))``, w^t the global model of round t); it is evaluated
with the personal copies. The personal copies start from the first global model the client receives, as
in the paper.

Budget: the global-model and personal updates share the round's local budget (``client.local_epochs``
passes, counted in mini-batch steps): ``personal_fraction`` of the steps on v, the rest on w."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies._avg import PERSONAL, Averaging, AveragingConfig, as_torch, sq_distance
from strategies._checks import require
from strategies.base import HEAD, register_strategy

SHARED = ("prompts", *HEAD)


@dataclass
class DittoConfig(AveragingConfig):
    name: str = "ditto"
    lam: float = 0.1  # pull of the personal model towards the global one: loss += lam/2 * ||v - w||^2
    personal_fraction: float = 0.5  # share of the local budget's steps spent on the personal model v (the rest trains the global model w)

    def validate(self) -> None:
        super().validate()
        require(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
        require(0 < self.personal_fraction < 1, "personal_fraction",
                f"must be in (0, 1), got {self.personal_fraction}")


@register_strategy
class Ditto(Averaging):
    name = "ditto"
    summary = "FedAvg global model + personal prompts/head regularised towards it by lam (Ditto)"
    config_cls = DittoConfig
    sends = SHARED
    personal = tuple(PERSONAL + k for k in SHARED)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, split_budget, start_tensors

        c = ctx.cfg.strategy
        v_steps, w_steps = split_budget(ctx, c.personal_fraction)
        w = start_tensors(ctx, received, {})
        w_losses = fit(ctx, w, list(SHARED), None, steps=w_steps)
        anchor = as_torch(received, SHARED)
        v = as_torch({k: state.get(PERSONAL + k, received[k]) for k in SHARED}, SHARED)
        lam = float(c.lam)
        losses = fit(ctx, v, list(SHARED), None, extra_loss=lambda t: 0.5 * lam * sq_distance(t, anchor), salt=1,
                     steps=v_steps)
        reply, _ = finish(ctx, cls.sends, (), received, w, losses, eval_tensors=v,
                          local_steps=len(w_losses) + len(losses))
        return reply, {PERSONAL + k: v[k].numpy().astype(np.float32).copy() for k in SHARED}
