"""pFedPG (Yang et al., ICCV 2023): a server-side attention generator of client-specific prompts.

    P_n = softmax((d_n W_Q)(P_base W_K)^T / sqrt(D)) (P_base W_V) W_O

``d_n`` (K x D) is client n's learnable descriptor (one query per prompt token), ``P_base`` (B x D)
the learnable prompt basis. The client's reply ``delta_n = P~_n - P_n`` is treated as the negative
gradient of its loss with respect to ``P_n`` and pushed into every generator parameter by the chain
rule: ``autograd.grad(P, params, grad_outputs=-delta)`` followed by an optimizer step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from strategies._checks import require, require_choice
from strategies.base import ClientUpdate, Strategy, StrategyConfig, register_strategy, weights_of


@dataclass
class PFedPGConfig(StrategyConfig):
    name: str = "pfedpg"
    server_lr: float = 1e-3  # generator learning rate (paper: 1e-3)
    server_optimizer: str = "adam"  # adam | sgd
    basis_size: Optional[int] = None  # rows of the prompt basis (default: model.num_prompts)
    basis_std: float = 1.0  # init std of the prompt basis
    descriptor_std: float = 1.0  # init std of client descriptors
    weighting: str = "uniform"  # how client deltas are weighted in the generator update: uniform | num_examples

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.server_optimizer, "server_optimizer", ("adam", "sgd"))
        require(self.basis_size is None or self.basis_size >= 1, "basis_size", f"must be >= 1, got {self.basis_size}")
        require(self.basis_std > 0, "basis_std", f"must be > 0, got {self.basis_std}")
        require(self.descriptor_std > 0, "descriptor_std", f"must be > 0, got {self.descriptor_std}")
        require_choice(self.weighting, "weighting", ("uniform", "num_examples"))


class PromptGenerator(nn.Module):
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

    def forward(self, client_idx: torch.Tensor) -> torch.Tensor:
        """(B,) client indices -> (B, K, D) prompts."""
        q = self.w_q(self.descriptors[client_idx])
        k = self.w_k(self.basis)
        v = self.w_v(self.basis)
        attn = torch.softmax(q @ k.T / math.sqrt(self.dim), dim=-1)
        return self.w_o(attn @ v)


@register_strategy
class PFedPG(Strategy):
    name = "pfedpg"
    summary = "server-side attention generator of client-specific prompts, chain-rule update (pFedPG, ICCV'23)"
    config_cls = PFedPGConfig
    sends = ("prompts",)

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        k, d = shapes["prompts"]
        self.generator = PromptGenerator(
            num_clients, k, d, config.basis_size or k, config.basis_std, config.descriptor_std, seed
        )
        params = list(self.generator.parameters())
        if config.server_optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.server_lr)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.server_lr)

    def generate(self, partition_ids: list[int]) -> torch.Tensor:
        return self.generator(torch.as_tensor(partition_ids, dtype=torch.long))

    def configure(self, server_round, partition_ids):
        with torch.no_grad():
            prompts = self.generate(partition_ids).numpy().astype(np.float32)
        return {pid: {"prompts": prompts[i].copy()} for i, pid in enumerate(partition_ids)}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        pids = [u.partition_id for u in updates]
        w = weights_of(updates, self.config.weighting)
        # Pseudo-gradient of the weighted client losses w.r.t. each client's prompts: -w_n * delta_n.
        grad_p = torch.stack([
            -float(wi) * torch.from_numpy(np.asarray(u.deltas["prompts"], dtype=np.float32))
            for wi, u in zip(w, updates)
        ])
        params = [p for p in self.generator.parameters()]
        prompts = self.generate(pids)
        grads = torch.autograd.grad(prompts, params, grad_outputs=grad_p)
        self.optimizer.zero_grad(set_to_none=True)
        for p, gp in zip(params, grads):
            p.grad = gp
        self.optimizer.step()
        return {"pseudo_grad_norm": float(grad_p.norm())}

    def state_dict(self):
        # Deep copies: torch's optimizer.load_state_dict keeps same-dtype tensors by reference, so a
        # shallow state would tie two strategies' Adam moments together.
        return copy.deepcopy({"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
