"""pFedPG (Yang et al., "Efficient Model Personalization in Federated Learning via Client-Specific Prompt
Generation", ICCV 2023): a server-side attention generator of client-specific prompts.

    P_n = softmax((d_n W_Q)(P_base W_K)^T / sqrt(D)) (P_base W_V) W_O

``d_n`` (K x D) is client n's learnable descriptor (one query per prompt token), ``P_base`` (B x D)
the learnable prompt basis. The update is the chain rule of :mod:`strategies._generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from strategies._checks import require
from strategies._generator import Generator, GeneratorConfig, GeneratorStrategy
from strategies.base import register_strategy


@dataclass
class PFedPGConfig(GeneratorConfig):
    name: str = "pfedpg"
    server_lr: float = 1e-3  # generator learning rate (paper: 1e-3)
    basis_size: Optional[int] = None  # rows of the prompt basis (default: model.num_prompts)
    basis_std: float = 1.0  # init std of the prompt basis
    descriptor_std: float = 1.0  # init std of client descriptors

    def validate(self) -> None:
        super().validate()
        require(self.basis_size is None or self.basis_size >= 1, "basis_size", f"must be >= 1, got {self.basis_size}")
        require(self.basis_std > 0, "basis_std", f"must be > 0, got {self.basis_std}")
        require(self.descriptor_std > 0, "descriptor_std", f"must be > 0, got {self.descriptor_std}")


class PromptGenerator(Generator):
    def __init__(self, num_clients: int, num_prompts: int, dim: int, basis_size: int,
                 basis_std: float, descriptor_std: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.basis = nn.Parameter(torch.randn(basis_size, dim, generator=g) * basis_std)
        self.descriptors = nn.Parameter(torch.randn(num_clients, num_prompts, dim, generator=g) * descriptor_std)
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        self.w_o = nn.Linear(dim, dim, bias=False)
        for lin in (self.w_q, self.w_k):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
        # Orthogonal value/output maps keep the generated prompts on the basis' scale.
        for lin in (self.w_v, self.w_o):
            nn.init.orthogonal_(lin.weight, generator=g)

    def from_descriptor(self, d: torch.Tensor) -> torch.Tensor:
        q = self.w_q(d)
        k = self.w_k(self.basis)
        v = self.w_v(self.basis)
        attn = torch.softmax(q @ k.T / math.sqrt(self.dim), dim=-1)
        return self.w_o(attn @ v)


@register_strategy
class PFedPG(GeneratorStrategy):
    name = "pfedpg"
    modalities = ("vision", "text", "llm")
    summary = "server-side attention generator of client-specific prompts, chain-rule update (pFedPG, ICCV'23)"
    config_cls = PFedPGConfig

    @classmethod
    def generator_shapes(cls, config, *, num_clients, shapes):
        k, d = shapes["prompts"]
        return {"basis": (config.basis_size or k, d), "descriptors": (num_clients, k, d),
                **{f"{w}.weight": (d, d) for w in ("w_q", "w_k", "w_v", "w_o")}}

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        k, d = shapes["prompts"]
        self.generator = PromptGenerator(
            num_clients, k, d, config.basis_size or k, config.basis_std, config.descriptor_std, seed
        )
        self._init_optimizer()
