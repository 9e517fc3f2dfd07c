"""Full-model FedAvg (McMahan et al., AISTATS 2017): every backbone weight, the prompts and the head are
trained by every client and averaged. The communication anchor of pFedPG's comparison (8.58e7 full-model
parameters against 7.68e3 generated prompt parameters per client and round).

Meant for small backbones (the default ``vit_fedpers_digits``, ~0.8M weights): a larger one is refused
unless ``strategy.max_backbone_params`` is raised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies._avg import Averaging, AveragingConfig
from strategies._checks import require
from strategies.base import HEAD, register_strategy
from strategies.fedavg import global_model_update


@dataclass
class FedAvgFullConfig(AveragingConfig):
    name: str = "fedavg_full"
    max_backbone_params: int = 10_000_000  # refuse backbones with more weights than this (all of them travel every round)

    def validate(self) -> None:
        super().validate()
        require(self.max_backbone_params >= 1, "max_backbone_params", f"must be >= 1, got {self.max_backbone_params}")


@register_strategy
class FedAvgFull(Averaging):
    name = "fedavg_full"
    summary = "FedAvg of the whole model (backbone + prompts + head): the communication anchor"
    config_cls = FedAvgFullConfig
    personal = ()
    trains_backbone = True
    modalities = ("vision",)  # the backbone weights it averages are a timm ViT's
    sends = ("prompts", *HEAD)  # extended per instance with the backbone's weights

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5, backbone_state=None):
        backbone = tuple(k for k in shapes if k.startswith("backbone."))
        n = sum(int(np.prod(shapes[k])) for k in backbone)
        if n > config.max_backbone_params:
            from fedpers.errors import ConfigError

            raise ConfigError("model.backbone", f"fedavg_full would send {n:,} backbone weights per client and round, "
                              f"more than strategy.max_backbone_params={config.max_backbone_params:,}; use a small "
                              "backbone (the default vit_fedpers_digits) or raise that limit")
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std,
                         backbone_state=backbone_state)

    @classmethod
    def tensor_roles(cls, shapes):
        """Sends the backbone's weights too; their names come from the backbone."""
        return (*cls.sends, *(k for k in shapes if k.startswith("backbone."))), cls.personal

    @classmethod
    def client_update(cls, ctx, received, state):
        backbone = tuple(k for k in ctx.shapes if k.startswith("backbone."))
        return global_model_update(ctx, received, state, (*cls.sends, *backbone))
