"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019): a federated body
and personal top layers, trained jointly on every client.

On a frozen prompted backbone the only trainable "body" is the prompts, so FedPer here *is* FedVPT:
shared prompts averaged by FedAvg, a personal head, joint local training. It is registered under its own
name so result tables line up with the literature; a test pins that it matches ``fedvpt`` exactly.
The variant that differs in the local schedule (head first, then body) is ``fedrep``."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.base import register_strategy
from strategies.fedvpt import FedVPT, FedVPTConfig


@dataclass
class FedPerConfig(FedVPTConfig):
    name: str = "fedper"


@register_strategy
class FedPer(FedVPT):
    name = "fedper"
    summary = "FedAvg body (the prompts), personal head, joint local training (FedPer; = fedvpt here)"
    config_cls = FedPerConfig
