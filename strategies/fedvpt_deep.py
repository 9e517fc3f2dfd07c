"""FedVPT-deep: VPT-deep (Jia et al., "Visual Prompt Tuning", ECCV 2022: fresh prompt tokens at the input
of every transformer block) federated with FedAvg (McMahan et al., AISTATS 2017). Clients train
``deep_prompts`` of shape (depth, K, D) and a personal head; the prompts are averaged."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._avg import Averaging, AveragingConfig
from strategies.base import register_strategy


@dataclass
class FedVPTDeepConfig(AveragingConfig):
    name: str = "fedvpt_deep"


@register_strategy
class FedVPTDeep(Averaging):
    name = "fedvpt_deep"
    summary = "FedAvg of deep visual prompts (K per block), personal heads (VPT-deep + FedAvg)"
    config_cls = FedVPTDeepConfig
    sends = ("deep_prompts",)
    deep_prompts = True
