"""Local training only: each client tunes its own prompts (or LoRA) and head; nothing crosses the network."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.base import HEAD, ClientUpdate, Strategy, StrategyConfig, register_strategy


@dataclass
class LocalConfig(StrategyConfig):
    name: str = "local"


@register_strategy
class Local(Strategy):
    name = "local"
    modalities = ("vision", "text", "llm")
    summary = "no federation: personal prompts and head per client (lower bound on collaboration)"
    config_cls = LocalConfig
    sends = ()
    personal = ("prompts", *HEAD)
    adapters = ("prompt", "prefix", "lora")

    @classmethod
    def tensor_roles(cls, shapes):
        return (), tuple(shapes)  # every client tensor (prompts or LoRA factors, and the head) stays local

    def configure(self, server_round, partition_ids):
        return {pid: {} for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        return {}
