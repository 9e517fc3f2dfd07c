"""APFL (Deng et al., "Adaptive Personalized Federated Learning", 2020): each client keeps a personal
model v and is evaluated with the mixture alpha * v + (1 - alpha) * w of its personal and the global
model w (prompts and head mixed tensor by tensor); w is trained by FedAvg.

Local schedule: the local copy of w is trained first for client.local_epochs, then v for as many epochs
through the mixture (with the updated w fixed), reusing the same batch order. The paper interleaves
the two updates step by step; the sequential form makes the limits exact (tests pin them):
alpha = 0 is ``fedavg_ft`` (evaluate w after local training), alpha = 1 is ``local``. alpha is fixed
(the paper's adaptive alpha is not implemented). v starts where a ``local`` client would start."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies._avg import PERSONAL, Averaging, AveragingConfig
from strategies._checks import require
from strategies.base import HEAD, register_strategy

SHARED = ("prompts", *HEAD)


@dataclass
class APFLConfig(AveragingConfig):
    name: str = "apfl"
    alpha: float = 0.5  # weight of the personal model in the evaluated mixture alpha*v + (1-alpha)*w, in [0, 1]

    def validate(self) -> None:
        super().validate()
        require(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")


@register_strategy
class APFL(Averaging):
    name = "apfl"
    summary = "FedAvg global model mixed with a personal model: alpha*v + (1-alpha)*w (APFL)"
    config_cls = APFLConfig
    sends = SHARED
    personal = tuple(PERSONAL + k for k in SHARED)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, initial_tensor, start_tensors
        from strategies._avg import as_torch

        alpha = float(ctx.cfg.strategy.alpha)
        w = start_tensors(ctx, received, {})
        fit(ctx, w, list(SHARED), ctx.cfg.client.local_epochs)
        both = dict(w)
        for k in SHARED:
            both[PERSONAL + k] = (as_torch(state, [PERSONAL + k])[PERSONAL + k] if PERSONAL + k in state
                                  else initial_tensor(ctx, k))

        def mix(t):
            return {k: alpha * t[PERSONAL + k] + (1 - alpha) * t[k] for k in SHARED}

        losses = fit(ctx, both, [PERSONAL + k for k in SHARED], ctx.cfg.client.local_epochs, view=mix)
        reply, _ = finish(ctx, cls.sends, (), received, w, losses, eval_tensors=mix(both))
        return reply, {PERSONAL + k: both[PERSONAL + k].numpy().astype(np.float32).copy() for k in SHARED}
