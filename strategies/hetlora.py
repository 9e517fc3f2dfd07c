"""HetLoRA (Cho et al., EMNLP 2024): clients train LoRA of different ranks.

Client n has rank ``r_n = strategy.ranks[n % len(ranks)]`` (at most ``model.lora.r``, the server's
rank). The server keeps full-rank factors and sends each client the truncation ``A[:r_n]``,
``B[:, :r_n]``; the client zero-pads them to the model's rank (zero rows of A / columns of B get zero
gradient, so the padded model is exactly a rank-r_n LoRA), trains, and returns deltas of the
truncated factors. The server zero-pads every delta to full rank and takes their weighted mean.
Not implemented: the paper's rank self-pruning and sparsity-weighted aggregation. The LoRA scaling is
``model.lora.alpha / model.lora.r`` for every client (peft's, for the shared full-rank model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from strategies._checks import require
from strategies.base import HEAD, ClientUpdate, register_strategy
from strategies.lora_baselines import _LoraAvg
from strategies.lora_common import LoraAvgConfig, lora_a, lora_b


@dataclass
class HetLoraConfig(LoraAvgConfig):
    name: str = "hetlora"
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8])  # client n gets ranks[n % len(ranks)] (<= model.lora.r)

    def validate(self) -> None:
        super().validate()
        require(len(self.ranks) >= 1 and all(r >= 1 for r in self.ranks), "ranks",
                f"must be a non-empty list of ranks >= 1, got {list(self.ranks)}")

    def validate_with(self, cfg) -> None:
        r = cfg.model.lora.r
        require(max(self.ranks) <= r, "ranks", f"every rank must be <= model.lora.r={r}, got {list(self.ranks)}")


def truncate(name: str, a: np.ndarray | torch.Tensor, r: int):
    return a[:r] if name.endswith("lora_A.weight") else a[:, :r]


def pad(name: str, a: np.ndarray, full: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(full, dtype=np.float32)
    if name.endswith("lora_A.weight"):
        out[: a.shape[0]] = a
    else:
        out[:, : a.shape[1]] = a
    return out


@register_strategy
class HetLora(_LoraAvg):
    name = "hetlora"
    summary = "heterogeneous LoRA ranks per client; zero-pad/truncate aggregation (HetLoRA)"
    config_cls = HetLoraConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return lora_a(shapes) + lora_b(shapes), HEAD

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        r_max = shapes[lora_a(shapes)[0]][0]
        if max(config.ranks) > r_max:
            raise ValueError(f"strategy.ranks={list(config.ranks)}: every rank must be <= model.lora.r={r_max}")

    def rank_of(self, partition_id: int) -> int:
        return int(self.config.ranks[partition_id % len(self.config.ranks)])

    def client_shapes(self, partition_id):
        r = self.rank_of(partition_id)
        return {k: tuple(truncate(k, np.empty(s, dtype=np.float32), r).shape) if k in self.sends else s
                for k, s in self.shapes.items()}

    def configure(self, server_round, partition_ids):
        return {pid: {k: truncate(k, v, self.rank_of(pid)).copy() for k, v in self.shared.tensors.items()}
                for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        padded = [ClientUpdate(u.partition_id, {k: pad(k, d, self.shapes[k]) for k, d in u.deltas.items()},
                               u.num_examples, u.metrics) for u in updates]
        return self.shared.apply(padded, self.config.weighting, self.config.server_lr)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        full = {k: pad(k, np.asarray(v, dtype=np.float32), ctx.shapes[k]) for k, v in received.items()}
        tensors = start_tensors(ctx, full, state)
        losses = fit(ctx, tensors, list(tensors), ctx.cfg.client.local_epochs)
        sends, personal = cls.tensor_roles(ctx.shapes)
        ranks = {k: (v.shape[0] if k.endswith("lora_A.weight") else v.shape[1]) for k, v in received.items()}
        sent_part = {k: truncate(k, tensors[k], ranks[k]) if k in received else tensors[k] for k in tensors}
        return finish(ctx, sends, personal, received, sent_part, losses, eval_tensors=tensors)
