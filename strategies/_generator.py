"""Server-side prompt generators (pFedPG, pFedHN): one learnable descriptor per client, a shared network
from descriptor to prompts, and the chain-rule update.

A client's reply ``delta_n = P~_n - P_n`` is treated as the negative gradient of its loss with respect to
the prompts ``P_n`` it received, and pushed into every generator parameter by the chain rule:
``autograd.grad(P, params, grad_outputs=-w_n * delta_n)`` followed by an optimizer step.

Clients that did not reply: a round changes neither their descriptors nor those rows of the optimizer's
state (:func:`step_rows`). With Adam or momentum a plain ``optimizer.step()`` would keep moving an absent
client's descriptor from its stale moments, silently changing what that client receives next (the rows
of a torch ``SparseAdam`` behave the same way; bias correction still uses the parameter's global count).

Optimizer: ``server_optimizer`` (adam | sgd) with ``server_momentum`` and ``server_weight_decay``;
``server_steps=per_round`` takes one step on the weighted sum of the round's replies (pFedPG),
``per_reply`` one step per reply in partition-id order (pFedHN's Algorithm 1: one hypernetwork step per
client it trains). With ``per_reply`` every reply's gradient is taken at the generator that produced the
prompts that client trained from, i.e. the generator as it was when the round was configured, not as
earlier replies of the same round have already moved it: pFedHN's code generates a client's weights
and takes that client's hypernetwork gradient at the same hypernetwork (AvivSham/pFedHN,
``experiments/pfedhn/trainer.py`` 126 and 172-174), then steps (181). Its code trains one client per
step, so the two coincide there; with several clients per round only the round-start generator
produced what they trained from. ``server_grad_clip`` clips the generator's gradient to that total
norm before every step (``trainer.py`` 180: ``clip_grad_norm_(hnet.parameters(), 50)``; 0 = off).

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
from strategies.base import ClientUpdate, Strategy, StrategyConfig, numel, weights_of


@dataclass
class GeneratorConfig(StrategyConfig):
    server_lr: float = 1e-3  # generator learning rate
    server_optimizer: str = "adam"  # adam | sgd
    server_momentum: float = 0.0  # SGD momentum of the generator optimizer (sgd only; pFedHN's code: 0.9)
    server_weight_decay: float = 0.0  # L2 weight decay of the generator optimizer (pFedHN's code: 1e-3)
    server_steps: str = "per_round"  # per_round: one step on the weighted sum of the round's replies | per_reply: one step per reply, in partition-id order, each reply's gradient taken at the round's (sending) generator
    server_grad_clip: float = 0.0  # clip the generator's gradient to this total L2 norm before each step (0 = off; pFedHN's code: 50)
    weighting: str = "uniform"  # how client deltas are weighted in the generator update: uniform | num_examples
    unseen_lr: float = 0.05  # Adam learning rate of a held-out client's descriptor (generator frozen)

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.server_optimizer, "server_optimizer", ("adam", "sgd"))
        require(0 <= self.server_momentum < 1, "server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        require(self.server_momentum == 0 or self.server_optimizer == "sgd", "server_momentum",
                "applies to server_optimizer=sgd only (Adam has its own moments)")
        require(self.server_weight_decay >= 0, "server_weight_decay", f"must be >= 0, got {self.server_weight_decay}")
        require_choice(self.server_steps, "server_steps", ("per_round", "per_reply"))
        require(self.server_grad_clip >= 0, "server_grad_clip", f"must be >= 0, got {self.server_grad_clip}")
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


def make_optimizer(params, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_slots(name: str, momentum: float = 0.0) -> int:
    """Tensors of a parameter's size the optimizer keeps per parameter: Adam's two moments (exp_avg,
    exp_avg_sq), SGD's momentum buffer when momentum > 0 (torch keeps none without momentum)."""
    if name == "adam":
        return 2
    return 1 if momentum > 0 else 0


def step_rows(optimizer: torch.optim.Optimizer, descriptors: nn.Parameter, rows: list[int]) -> None:
    """``optimizer.step()`` that leaves every row of ``descriptors`` not in ``rows`` unchanged, together with
    the same rows of its optimizer state (momentum buffer, Adam moments). Other parameters step as usual."""
    keep = torch.ones(descriptors.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(sorted(set(rows)), dtype=torch.long)] = False
    saved = descriptors.data[keep].clone()
    state = optimizer.state.get(descriptors, {})
    saved_state = {k: v[keep].clone() for k, v in state.items()
                   if torch.is_tensor(v) and v.shape == descriptors.shape}
    optimizer.step()
    descriptors.data[keep] = saved
    for k, v in optimizer.state[descriptors].items():
        if k in saved_state:
            v[keep] = saved_state[k]
        elif torch.is_tensor(v) and v.shape == descriptors.shape:
            v[keep] = 0.0  # state created by this step: absent rows start from zero, as if never stepped


class GeneratorStrategy(Strategy):
    sends = ("prompts",)
    generator: Generator

    @classmethod
    def generator_shapes(cls, config, *, num_clients: int, shapes) -> dict[str, tuple[int, ...]]:
        """Every generator parameter by name, as ``generator.named_parameters()`` will have it."""
        raise NotImplementedError

    @classmethod
    def server_state_numel(cls, config, *, num_clients, shapes):
        """The generator's parameters and its optimizer's per-parameter state (:func:`optimizer_slots`)."""
        params = numel(cls.generator_shapes(config, num_clients=num_clients, shapes=shapes).values())
        return params * (1 + optimizer_slots(config.server_optimizer, config.server_momentum))

    def _init_optimizer(self) -> None:
        c = self.config
        self.optimizer = make_optimizer(list(self.generator.parameters()), c.server_optimizer, c.server_lr,
                                        c.server_momentum, c.server_weight_decay)
        self._unseen: dict[int, int] = {}  # held-out partition id -> row of _unseen_desc

    def generate(self, partition_ids: list[int]) -> torch.Tensor:
        return self.generator(torch.as_tensor(partition_ids, dtype=torch.long))

    def configure(self, server_round, partition_ids):
        with torch.no_grad():
            prompts = self.generate(partition_ids).numpy().astype(np.float32)
        return {pid: {"prompts": prompts[i].copy()} for i, pid in enumerate(partition_ids)}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        if self.config.server_steps == "per_reply":
            # Each reply's gradient at the generator that sent its prompts (this round's, before any step),
            # applied one step per reply in partition-id order (pFedHN, trainer.py 126, 172-181).
            sender = copy.deepcopy(self.generator)
            norms = [self._step([u], "uniform", sender) for u in updates]
            return {"pseudo_grad_norm": float(np.sqrt(np.sum(np.square(norms))))}
        return {"pseudo_grad_norm": self._step(updates, self.config.weighting)}

    def _step(self, updates: list[ClientUpdate], weighting: str, at: Generator | None = None) -> float:
        """One optimizer step of the live generator on the chain-rule gradient of ``updates``, taken at the
        generator ``at`` (default: the live one); clipped to ``server_grad_clip`` when that is > 0."""
        at = self.generator if at is None else at
        params = list(self.generator.parameters())
        pids = [u.partition_id for u in updates]
        grads, norm = chain_rule_grads(at(torch.as_tensor(pids, dtype=torch.long)), list(at.parameters()),
                                       updates, weighting)
        self.optimizer.zero_grad(set_to_none=True)
        for p, gp in zip(params, grads):
            p.grad = gp.detach().clone()
        if self.config.server_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.server_grad_clip)
        step_rows(self.optimizer, self.generator.descriptors, pids)
        return norm

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
        step_rows(self._unseen_opt, self._unseen_desc, [self._unseen[u.partition_id] for u in updates])
        return {"unseen_pseudo_grad_norm": norm}

    def state_dict(self):
        # Deep copies: torch's optimizer.load_state_dict keeps same-dtype tensors by reference, so a
        # shallow state would tie two strategies' Adam moments together.
        return copy.deepcopy({"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
