"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", 2019): a federated body
and personal top layers, trained jointly on every client.

FedPer's definition is "shared base layers, personal top layers". On a frozen prompted backbone the only
trainable base is the prompts and the only personal layer is the head, so FedPer here *is* FedVPT
(shared prompts averaged by FedAvg, a personal head, joint local training): ``fedper`` is a documented
alias of ``fedvpt`` (the class overrides nothing), registered under its own name so result tables line
up with the literature. It is not a separate method, and a table listing both shows the same method
twice. The variant that differs in the local schedule (head first, then body) is ``fedrep``."""

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
    summary = "alias of fedvpt: FedAvg body (the prompts), personal head, joint local training (FedPer)"
    config_cls = FedPerConfig
