"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated Learning",
ICML 2021, Algorithm 1): each round a client first updates its personal head with the received shared
representation frozen (Algorithm 1, lines 6-8: tau_h head steps), then updates the representation (here:
the prompts) with its new head frozen (lines 9-11: tau steps); only the representation is averaged
(line 14).

Budget: the two phases share the round's local budget (``client.local_epochs`` passes, counted in
mini-batch steps): ``head_fraction`` of the steps on the head, the rest on the prompts. The paper runs
many more head steps than body steps (10 head epochs, 1 body epoch); its ratio is ``head_fraction=0.9``."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._avg import Averaging, AveragingConfig
from strategies._checks import require
from strategies.base import HEAD, register_strategy


@dataclass
class FedRepConfig(AveragingConfig):
    name: str = "fedrep"
    head_fraction: float = 0.5  # share of the local budget's steps spent on the head (prompts frozen), first; the rest trains the prompts (head frozen)

    def validate(self) -> None:
        super().validate()
        require(0 < self.head_fraction < 1, "head_fraction", f"must be in (0, 1), got {self.head_fraction}")


@register_strategy
class FedRep(Averaging):
    name = "fedrep"
    summary = "shared prompts, personal head; head steps then prompt steps within one local budget (FedRep)"
    config_cls = FedRepConfig
    sends = ("prompts",)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, split_budget, start_tensors

        head_steps, body_steps = split_budget(ctx, ctx.cfg.strategy.head_fraction)
        tensors = start_tensors(ctx, received, state)
        losses = fit(ctx, tensors, list(HEAD), None, salt=1, steps=head_steps)
        losses += fit(ctx, tensors, ["prompts"], None, salt=2, steps=body_steps)
        return finish(ctx, cls.sends, cls.personal, received, tensors, losses)
