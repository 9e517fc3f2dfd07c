"""pFedHN (Shamsian et al., "Personalized Federated Learning using Hypernetworks", ICML 2021): an MLP
hypernetwork maps a learnable client embedding to that client's parameters, here its prompts (the head
stays personal, as in pFedHN-PC). The update is pFedHN's: grad of the hypernetwork by the chain rule with
the client's delta (see :mod:`strategies._generator`; Algorithm 1, lines 7-9: ``grad_phi = (grad_phi
theta_i)^T (theta_i - theta~_i)``); novel clients fit only their embedding.

Optimizer. The paper (and its code, AvivSham/pFedHN) takes one SGD step per trained client, lr 1e-2,
momentum 0.9, weight decay 1e-3 (``experiments/pfedhn/trainer.py`` 97-101, 273-274), each client's
hypernetwork gradient taken at the hypernetwork that generated its weights (126, 172-174) and clipped to
norm 50 before the step (180-181): ``server_optimizer=sgd server_lr=0.01 server_momentum=0.9
server_weight_decay=1e-3 server_steps=per_reply server_grad_clip=50``
(``experiments/configs/pfedhn_paper.yaml``). With several clients per round, ``per_reply`` takes every
reply's gradient at the round's generator (the one that sent the prompts) and steps once per reply in
partition-id order. Not modelled: the code's separate ``embed_lr`` for the embeddings (it defaults to
``lr``, 95) and its clipping of the client's inner-loop gradient at 50 (160, local training, not the
server's). The default here is Adam, lr 1e-3, one step per round on the mean of the replies, no
clipping: the same server optimizer as ``pfedpg``, so a pFedPG-vs-pFedHN comparison differs only in the
generator, and the paper's SGD setting was tuned for hypernetworks emitting a whole CNN after 50 inner
steps, not K x D prompts (see the README for the measured difference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from strategies._checks import require
from strategies._generator import Generator, GeneratorConfig, GeneratorStrategy
from strategies.base import register_strategy


@dataclass
class PFedHNConfig(GeneratorConfig):
    name: str = "pfedhn"
    server_lr: float = 1e-3  # hypernetwork learning rate
    embed_dim: int = 16  # client embedding size
    hidden_dim: int = 100  # width of the hypernetwork's hidden layers (paper: 100)
    n_hidden: int = 3  # hidden layers (paper: 3)
    embed_std: float = 1.0  # init std of client embeddings
    output_std: float = 0.5  # init std of the output layer's weights, scaled by 1/sqrt(hidden_dim): sets the initial prompt scale

    def validate(self) -> None:
        super().validate()
        for f in ("embed_dim", "hidden_dim", "n_hidden"):
            require(getattr(self, f) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        require(self.embed_std > 0, "embed_std", f"must be > 0, got {self.embed_std}")
        require(self.output_std > 0, "output_std", f"must be > 0, got {self.output_std}")


class HyperNetwork(Generator):
    def __init__(self, num_clients: int, num_prompts: int, dim: int, c: PFedHNConfig, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shape = (num_prompts, dim)
        self.descriptors = nn.Parameter(torch.randn(num_clients, c.embed_dim, generator=g) * c.embed_std)
        layers: list[nn.Module] = []
        width = c.embed_dim
        for _ in range(c.n_hidden):
            lin = nn.Linear(width, c.hidden_dim)
            nn.init.kaiming_uniform_(lin.weight, nonlinearity="relu", generator=g)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
            width = c.hidden_dim
        out = nn.Linear(width, num_prompts * dim)
        nn.init.normal_(out.weight, std=c.output_std / width**0.5, generator=g)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*layers, out)

    def from_descriptor(self, d: torch.Tensor) -> torch.Tensor:
        return self.mlp(d).view(d.shape[0], *self.shape)


@register_strategy
class PFedHN(GeneratorStrategy):
    name = "pfedhn"
    modalities = ("vision", "text", "llm")
    summary = "MLP hypernetwork from a learnable client embedding to its prompts, chain-rule update (pFedHN)"
    config_cls = PFedHNConfig

    @classmethod
    def generator_shapes(cls, config, *, num_clients, shapes):
        k, d = shapes["prompts"]
        out, width = {"descriptors": (num_clients, config.embed_dim)}, config.embed_dim
        for i in range(config.n_hidden + 1):  # Linear layers at even indices of the Sequential (ReLUs between)
            fan_out = config.hidden_dim if i < config.n_hidden else k * d
            out.update({f"mlp.{2 * i}.weight": (fan_out, width), f"mlp.{2 * i}.bias": (fan_out,)})
            width = fan_out
        return out

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        k, d = shapes["prompts"]
        self.generator = HyperNetwork(num_clients, k, d, config, seed)
        self._init_optimizer()
