"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017) on the prompt-tuned model: prompts and head are both global and averaged; nothing is
personal. Each client reports the accuracy of the global model it received, on its own test split."""

from __future__ import annotations

from dataclasses import dataclass

from strategies._avg import Averaging, AveragingConfig
from strategies.base import HEAD, register_strategy


@dataclass
class FedAvgConfig(AveragingConfig):
    name: str = "fedavg"


def global_model_update(ctx, received, state, sends, extra_loss=None):
    """Train every sent tensor from the global values; evaluate the global model as received."""
    from fedpers.client import finish, fit, start_tensors

    tensors = start_tensors(ctx, received, state)
    losses = fit(ctx, tensors, list(sends), ctx.cfg.client.local_epochs, extra_loss=extra_loss)
    return finish(ctx, sends, (), received, tensors, losses, eval_tensors=start_tensors(ctx, received, state))


@register_strategy
class FedAvg(Averaging):
    name = "fedavg"
    modalities = ("vision", "text", "llm")
    summary = "FedAvg of prompts and head (one global model, evaluated on each client's test split)"
    config_cls = FedAvgConfig
    sends = ("prompts", *HEAD)
    personal = ()

    @classmethod
    def client_update(cls, ctx, received, state):
        return global_model_update(ctx, received, state, cls.tensor_roles(ctx.shapes)[0])
