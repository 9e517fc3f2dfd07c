"""HetLoRA (Cho, Liu, Manoel, Joshi, Sahu, Xu, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, Section 3): clients train LoRA of different ranks.

- **Distribution by truncation.** The server keeps full-rank factors (rank ``model.lora.r``); client n
  with rank r_n receives ``A[:r_n]`` and ``B[:, :r_n]``. Initial ranks: ``strategy.ranks[n % len(ranks)]``.
- **Local training with rank self-pruning.** The client zero-pads the factors to the model's rank (zero
  rows of A / columns of B get zero gradient, so the padded model is exactly a rank-r_n LoRA) and adds
  ``prune_lambda * ||B[:, k:r_n]||_F * ||A[k:r_n]||_F`` per module to its loss, k = max(1, floor(gamma *
  r_n)) with gamma = ``prune_gamma``: a penalty on the trailing rank components. After training, if
  those components' norm (summed over modules) is below ``prune_threshold`` times its value before
  training, the client prunes them (sets them to zero) and its rank becomes k from the next round on.
  The client reports its rank as the ``rank`` metric; the server keeps it (ranks never grow).
- **Sparsity-weighted aggregation of zero-padded modules.** The server zero-pads each client's trained
  factors (received + delta) to full rank and, module by module, sets the global factors to
  ``sum_n p_n pad(A_n)`` and ``sum_n p_n pad(B_n)`` with ``p_n = S_n / sum_m S_m``,
  ``S_n = ||B_n A_n||_F`` (the module's update norm). Components that no sampled client holds become
  zero, as in the paper's aggregate. ``weighting=num_examples|uniform`` swaps the weights (ablation).

The LoRA scaling is ``model.lora.alpha / model.lora.r`` for every client (peft's, for the shared model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from strategies._checks import require, require_choice
from strategies.base import HEAD, ClientUpdate, register_strategy, weights_of
from strategies.lora_baselines import _LoraAvg
from strategies.lora_common import LoraAvgConfig, lora_a, lora_b
from strategies.lora_fold import pad, truncate


@dataclass
class HetLoraConfig(LoraAvgConfig):
    name: str = "hetlora"
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8])  # initial ranks: client n starts at ranks[n % len(ranks)] (<= model.lora.r)
    weighting: str = "sparsity"  # aggregation weights: sparsity (the paper: ||B_n A_n||_F per module) | num_examples | uniform
    prune_gamma: float = 0.9  # rank decay: the trailing components beyond max(1, floor(gamma * rank)) are regularised and may be pruned
    prune_lambda: float = 0.01  # weight of the self-pruning penalty ||B_trail||_F * ||A_trail||_F in the local loss (0 = none)
    prune_threshold: float = 1.0  # prune when the trailing components' norm after local training is below this times its norm before

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.weighting, "weighting", ("sparsity", "num_examples", "uniform"))
        require(len(self.ranks) >= 1 and all(r >= 1 for r in self.ranks), "ranks",
                f"must be a non-empty list of ranks >= 1, got {list(self.ranks)}")
        require(0 < self.prune_gamma < 1, "prune_gamma", f"must be in (0, 1), got {self.prune_gamma}")
        require(self.prune_lambda >= 0, "prune_lambda", f"must be >= 0, got {self.prune_lambda}")
        require(self.prune_threshold >= 0, "prune_threshold", f"must be >= 0, got {self.prune_threshold}")

    def validate_with(self, cfg) -> None:
        r = cfg.model.lora.r
        require(max(self.ranks) <= r, "ranks", f"every rank must be <= model.lora.r={r}, got {list(self.ranks)}")


def rank_of_factor(name: str, a) -> int:
    return a.shape[0] if name.endswith("lora_A.weight") else a.shape[1]


def kept_rank(rank: int, gamma: float) -> int:
    return max(1, math.floor(gamma * rank))


def trailing_norm(tensors, pairs, lo: int, hi: int) -> torch.Tensor:
    """sum over modules of ||B[:, lo:hi]||_F * ||A[lo:hi]||_F (zero when lo >= hi)."""
    total = torch.zeros(())
    for a, b in pairs:
        total = total + tensors[b][:, lo:hi].norm() * tensors[a][lo:hi].norm()
    return total


def sparsity_weights(modules: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """p_n = ||B_n A_n||_F / sum_m ||B_m A_m||_F for one module (uniform if every norm is zero)."""
    s = np.array([np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)) for a, b in modules])
    return s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / len(s))


@register_strategy
class HetLora(_LoraAvg):
    name = "hetlora"
    summary = "heterogeneous LoRA ranks: truncation, rank self-pruning, sparsity-weighted zero-padded aggregation (HetLoRA)"
    config_cls = HetLoraConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return lora_a(shapes) + lora_b(shapes), HEAD

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        r_max = shapes[lora_a(shapes)[0]][0]
        if max(config.ranks) > r_max:
            raise ValueError(f"strategy.ranks={list(config.ranks)}: every rank must be <= model.lora.r={r_max}")
        self.ranks = {n: int(config.ranks[n % len(config.ranks)]) for n in range(num_clients)}

    def rank_of(self, partition_id: int) -> int:
        return self.ranks.get(partition_id, int(self.config.ranks[partition_id % len(self.config.ranks)]))

    def client_shapes(self, partition_id):
        r = self.rank_of(partition_id)
        return {k: tuple(truncate(k, np.empty(s, dtype=np.float32), r).shape) if k in self.sends else s
                for k, s in self.shapes.items()}

    def configure(self, server_round, partition_ids):
        return {pid: {k: truncate(k, v, self.rank_of(pid)).copy() for k, v in self.shared.tensors.items()}
                for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        # Each client's trained module = what it was sent (the truncation of the current global factors
        # at the rank of its reply) + its delta, zero-padded to full rank.
        trained = [{k: pad(k, truncate(k, g, rank_of_factor(k, u.deltas[k])) + u.deltas[k], self.shapes[k])
                    for k, g in self.shared.tensors.items()} for u in updates]
        fixed = None if self.config.weighting == "sparsity" else weights_of(updates, self.config.weighting)
        lr, sq = self.config.server_lr, 0.0
        for a, b in zip(lora_a(self.shapes), lora_b(self.shapes)):
            p = fixed if fixed is not None else sparsity_weights([(t[a], t[b]) for t in trained])
            for k in (a, b):
                new = sum(pi * t[k].astype(np.float64) for pi, t in zip(p, trained))
                step = lr * (new - self.shared.tensors[k])
                self.shared.tensors[k] = (self.shared.tensors[k] + step).astype(np.float32)
                sq += float((step ** 2).sum())
        for u in updates:  # self-pruned ranks take effect from the next round; ranks never grow
            sent = self.rank_of(u.partition_id)
            got = u.metrics.get("rank")
            if got is not None and np.isfinite(got):
                self.ranks[u.partition_id] = int(min(sent, max(1, int(got))))
        ranks = [self.rank_of(u.partition_id) for u in updates]
        return {"delta_norm": sq ** 0.5, "rank_mean": float(np.mean(ranks)) if ranks else float("nan")}

    def state_dict(self):
        return {**super().state_dict(), "ranks": {str(k): v for k, v in self.ranks.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ranks.update({int(k): int(v) for k, v in state.get("ranks", {}).items()})

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, local_budget, start_tensors

        c = ctx.cfg.strategy
        full = {k: pad(k, np.asarray(v, dtype=np.float32), ctx.shapes[k]) for k, v in received.items()}
        tensors = start_tensors(ctx, full, state)
        pairs = list(zip(lora_a(ctx.shapes), lora_b(ctx.shapes)))
        r = rank_of_factor(pairs[0][0], received[pairs[0][0]])
        k = kept_rank(r, c.prune_gamma)
        before = float(trailing_norm(tensors, pairs, k, r))
        lam = float(c.prune_lambda)
        penalty = (lambda t: lam * trailing_norm(t, pairs, k, r)) if lam > 0 and k < r else None
        losses = fit(ctx, tensors, list(tensors), None, extra_loss=penalty, steps=local_budget(ctx))
        after = float(trailing_norm(tensors, pairs, k, r))
        new_rank = r
        if k < r and after < c.prune_threshold * before:
            new_rank = k
            for a, b in pairs:  # the pruned module is the rank-k one; its trailing components are gone
                tensors[a][k:r] = 0.0
                tensors[b][:, k:r] = 0.0
        sends, personal = cls.tensor_roles(ctx.shapes)
        sent_part = {n: truncate(n, tensors[n], r) if n in received else tensors[n] for n in tensors}
        return finish(ctx, sends, personal, received, sent_part, losses, eval_tensors=tensors,
                      extra_metrics={"rank": float(new_rank)})
