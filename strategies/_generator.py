"""Server-side prompt generators (pFedPG, pFedHN): one learnable descriptor per client, a shared network
from descriptor to prompts, and the chain-rule update.

A client's reply ``delta_n = P~_n - P_n`` is treated as the negative gradient of its loss with respect to
the prompts ``P_n`` it received, and pushed into every generator parameter by the chain rule:
``autograd.grad(P, params, grad_outputs=-w_n * delta_n)`` followed by an optimizer step.

Unseen clients: the trained generator is frozen; a held-out client gets a new descriptor (initialised
at the mean of the trained clients' descriptors) and only that descriptor is fitted, by the same chain
rule, from the deltas the client returns over a few exchanges (pFedHN's novel-client procedure, with the
client's data staying on the client: only prompts and deltas travel).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strategies._checks import require, require_choice
from strategies.base import ClientUpdate, Strategy, StrategyConfig, weights_of


@dataclass
class GeneratorConfig(StrategyConfig):
    server_lr: float = 1e-3  # generator learning rate
    server_optimizer: str = "adam"  # adam | sgd
    weighting: str = "uniform"  # how client deltas are weighted in the generator update: uniform | num_examples
    unseen_lr: float = 0.05  # Adam learning rate of a held-out client's descriptor (generator frozen)

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.server_optimizer, "server_optimizer", ("adam", "sgd"))
        require_choice(self.weighting, "weighting", ("uniform", "num_examples"))
        require(self.unseen_lr > 0, "unseen_lr", f"must be > 0, got {self.unseen_lr}")


class Generator(nn.Module):
    """Subclasses define ``descriptors`` (num_clients, ...) and ``from_descriptor``."""

    descriptors: nn.Parameter

    def from_descriptor(self, d: torch.Tensor) -> torch.Tensor:
        """(B, *descriptor shape) -> (B, K, D) prompts."""
        raise NotImplementedError

    def forward(self, client_idx: torch.Tensor) -> torch.Tensor:
        return self.from_descriptor(self.descriptors[client_idx])


def chain_rule_grads(prompts: torch.Tensor, params: list[torch.Tensor], updates: list[ClientUpdate],
                     weighting: str) -> tuple[tuple[torch.Tensor, ...], float]:
    """d(sum_n w_n L_n)/d(params), with -delta_n standing in for dL_n/dP_n."""
    w = weights_of(updates, weighting)
    grad_p = torch.stack([
        -float(wi) * torch.from_numpy(np.asarray(u.deltas["prompts"], dtype=np.float32))
        for wi, u in zip(w, updates)
    ])
    return torch.autograd.grad(prompts, params, grad_outputs=grad_p), float(grad_p.norm())


class GeneratorStrategy(Strategy):
    sends = ("prompts",)
    generator: Generator

    def _init_optimizer(self) -> None:
        params = list(self.generator.parameters())
        cls = torch.optim.Adam if self.config.server_optimizer == "adam" else torch.optim.SGD
        self.optimizer = cls(params, lr=self.config.server_lr)
        self._unseen: dict[int, int] = {}  # held-out partition id -> row of _unseen_desc

    def generate(self, partition_ids: list[int]) -> torch.Tensor:
        return self.generator(torch.as_tensor(partition_ids, dtype=torch.long))

    def configure(self, server_round, partition_ids):
        with torch.no_grad():
            prompts = self.generate(partition_ids).numpy().astype(np.float32)
        return {pid: {"prompts": prompts[i].copy()} for i, pid in enumerate(partition_ids)}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        params = list(self.generator.parameters())
        grads, norm = chain_rule_grads(self.generate([u.partition_id for u in updates]), params, updates,
                                       self.config.weighting)
        self.optimizer.zero_grad(set_to_none=True)
        for p, gp in zip(params, grads):
            p.grad = gp
        self.optimizer.step()
        return {"pseudo_grad_norm": norm}

    # -- unseen clients: fit a fresh descriptor per held-out client against the frozen generator --
    def _unseen_prompts(self, partition_ids: list[int]) -> torch.Tensor:
        new = [p for p in partition_ids if p not in self._unseen]
        if new:
            trained = [i for i in range(self.num_clients) if i not in set(partition_ids) | set(self._unseen)]
            with torch.no_grad():
                start = self.generator.descriptors[trained or list(range(self.num_clients))].mean(0)
            rows = [] if not self._unseen else [self._unseen_desc.detach()]
            self._unseen.update({p: len(self._unseen) + i for i, p in enumerate(new)})
            self._unseen_desc = nn.Parameter(torch.cat(rows + [start.expand(len(new), *start.shape).clone()]))
            self._unseen_opt = torch.optim.Adam([self._unseen_desc], lr=self.config.unseen_lr)
        idx = torch.as_tensor([self._unseen[p] for p in partition_ids], dtype=torch.long)
        return self.generator.from_descriptor(self._unseen_desc[idx])

    def configure_unseen(self, server_round, partition_ids):
        with torch.no_grad():
            prompts = self._unseen_prompts(partition_ids).numpy().astype(np.float32)
        return {pid: {"prompts": prompts[i].copy()} for i, pid in enumerate(partition_ids)}

    def adapt_unseen(self, server_round, updates: list[ClientUpdate]):
        if not updates:
            return {}
        prompts = self._unseen_prompts([u.partition_id for u in updates])
        # Each new client's descriptor gets its own (unweighted) loss: their fits are independent.
        (grad,), norm = chain_rule_grads(prompts, [self._unseen_desc], updates, "uniform")
        self._unseen_opt.zero_grad(set_to_none=True)
        self._unseen_desc.grad = grad
        self._unseen_opt.step()
        return {"unseen_pseudo_grad_norm": norm}

    def state_dict(self):
        # Deep copies: torch's optimizer.load_state_dict keeps same-dtype tensors by reference, so a
        # shallow state would tie two strategies' Adam moments together.
        return copy.deepcopy({"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
