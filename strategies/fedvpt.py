"""FedVPT: visual prompt tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022) federated with FedAvg
(McMahan et al., AISTATS 2017): one global set of shallow prompts averaged across clients; every client
keeps a personal linear head. This is the "FedVPT" baseline of pFedPG (Yang et al., ICCV 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._avg import Averaging, AveragingConfig
from strategies.base import register_strategy


@dataclass
class FedVPTConfig(AveragingConfig):
    name: str = "fedvpt"


@register_strategy
class FedVPT(Averaging):
    name = "fedvpt"
    summary = "FedAvg of shared visual prompts, personal heads (VPT + FedAvg)"
    config_cls = FedVPTConfig
    sends = ("prompts",)
