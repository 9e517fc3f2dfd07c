"""FedAvg + local fine-tuning (FedAvg-FT; the standard personalization baseline of e.g. Wang et al.,
"Federated Evaluation of On-device Personalization", 2019, and Yu et al., "Salvaging Federated Learning
by Local Adaptation", 2020): the global prompts and head are trained by FedAvg; each client evaluates
the global model after adapting it to its own data. The adaptation never reaches the server."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._avg import Averaging, AveragingConfig
from strategies._checks import require, require_choice
from strategies.base import HEAD, register_strategy


@dataclass
class FedAvgFTConfig(AveragingConfig):
    name: str = "fedavg_ft"
    ft_epochs: int = 0  # extra fine-tuning epochs before evaluation (0: evaluate the global model after this round's client.local_epochs of local training)
    ft_tensors: str = "all"  # what the extra fine-tuning trains: all | head

    def validate(self) -> None:
        super().validate()
        require(self.ft_epochs >= 0, "ft_epochs", f"must be >= 0, got {self.ft_epochs}")
        require_choice(self.ft_tensors, "ft_tensors", ("all", "head"))


@register_strategy
class FedAvgFT(Averaging):
    name = "fedavg_ft"
    summary = "FedAvg of prompts and head, evaluated after local fine-tuning (FedAvg-FT)"
    config_cls = FedAvgFTConfig
    sends = ("prompts", *HEAD)
    personal = ()

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        c = ctx.cfg.strategy
        tensors = start_tensors(ctx, received, state)
        losses = fit(ctx, tensors, list(cls.sends), ctx.cfg.client.local_epochs)
        tuned, ft_losses = tensors, []
        if c.ft_epochs > 0:
            tuned = {k: v.clone() for k, v in tensors.items()}
            names = list(cls.sends) if c.ft_tensors == "all" else list(HEAD)
            ft_losses = fit(ctx, tuned, names, c.ft_epochs, salt=2)
        # extra fine-tuning is compute on top of the shared budget: it is counted, so tables show it
        return finish(ctx, cls.sends, cls.personal, received, tensors, losses, eval_tensors=tuned,
                      local_steps=len(losses) + len(ft_losses))
