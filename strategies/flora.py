"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", Sec. 3.2, stacking-based aggregation).

Every round each sampled client k trains a freshly initialised LoRA of its own rank r_k. The server
*stacks* the factors instead of averaging them:

    A = [p_1 A_1; p_2 A_2; ...; p_K A_K]   ((sum r_k) x in, rows stacked)
    B = [B_1, B_2, ..., B_K]               (out x (sum r_k), columns stacked)

so ``B A = sum_k p_k B_k A_k`` exactly (``p_k``: ``strategy.weighting``; the paper uses data sizes) and
ranks may differ without padding. The clients merge ``s B A`` into their weights (``W <- W + s B A``)
and start a new LoRA next round.

Frozen-backbone form: the merged weights are the server's accumulated ``fold`` per module
(``strategies.lora_fold``; the client adds ``s * fold`` to the frozen weight), broadcast every round with
the client's fresh factors (A seeded by (seed, round, client), B zero, truncated to r_k). The paper sends
the round's stacked factors, sum_k r_k (in + out) numbers per module, and each client merges them into
its own copy of W; here the copy is not the client's, so the accumulated merge is sent dense (out x in
per module, more bytes than the paper's stack once sum_k r_k (in + out) < in x out; the table reports
ours). A client trains its rank-r_k LoRA inside the model's rank-r module zero-padded (exact; see
``lora_fold.pad``); peft's scaling ``lora_alpha / model.lora.r`` applies to every client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from strategies._checks import require
from strategies.base import HEAD, ClientUpdate, Strategy, numel, register_strategy, weights_of
from strategies.lora_common import LoraAvgConfig, init_lora, require_lora
from strategies.lora_fold import (
    a_of,
    add_folds,
    b_of,
    factor_names,
    fold_of,
    fold_shapes,
    modules,
    pad,
    truncate,
)

FRESH_SALT = 0xF10A


@dataclass
class FLoraConfig(LoraAvgConfig):
    name: str = "flora"
    ranks: list[int] = field(default_factory=list)  # client n trains rank ranks[n % len(ranks)] (<= model.lora.r); empty = model.lora.r for all

    def validate(self) -> None:
        require(self.server_lr == 1.0, "server_lr", f"flora merges the stacked product as is; must be 1.0, got {self.server_lr}")
        super().validate()
        require(all(r >= 1 for r in self.ranks), "ranks", f"every rank must be >= 1, got {list(self.ranks)}")

    def validate_with(self, cfg) -> None:
        r = cfg.model.lora.r
        require(not self.ranks or max(self.ranks) <= r, "ranks",
                f"every rank must be <= model.lora.r={r}, got {list(self.ranks)}")


def stack(factors: list[tuple[np.ndarray, np.ndarray]], weights) -> tuple[np.ndarray, np.ndarray]:
    """``[(B_k, A_k)]`` of any ranks -> (B, A) stacked so that ``B @ A = sum_k p_k B_k A_k``."""
    a = np.concatenate([p * np.asarray(ak, dtype=np.float64) for p, (_, ak) in zip(weights, factors)], axis=0)
    b = np.concatenate([np.asarray(bk, dtype=np.float64) for bk, _ in factors], axis=1)
    return b, a


@register_strategy
class FLora(Strategy):
    name = "flora"
    summary = "fresh LoRA per round; server stacks the clients' factors (sum of BA products, any ranks) and merges them into the frozen weight (FLoRA)"
    config_cls = FLoraConfig
    modalities = ("text", "llm")
    adapters = ("lora",)

    @classmethod
    def tensor_roles(cls, shapes):
        return factor_names(shapes), HEAD

    @classmethod
    def broadcast_shapes(cls, config, *, num_clients, shapes):
        return fold_shapes(shapes)

    @classmethod
    def server_state_numel(cls, config, *, num_clients, shapes):
        """The folded merges only: each round's fresh factors are drawn again, not kept."""
        return numel(cls.broadcast_shapes(config, num_clients=num_clients, shapes=shapes).values())

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        require_lora(shapes, self.name)
        r_max = shapes[a_of(modules(shapes)[0])][0]
        if config.ranks and max(config.ranks) > r_max:
            raise ValueError(f"strategy.ranks={list(config.ranks)}: every rank must be <= model.lora.r={r_max}")
        self.broadcast = type(self).broadcast_shapes(config, num_clients=num_clients, shapes=shapes)
        self.fold = {k: np.zeros(s, dtype=np.float32) for k, s in self.broadcast.items()}

    def rank_of(self, partition_id: int) -> int:
        ranks = self.config.ranks
        return int(ranks[partition_id % len(ranks)]) if ranks else self.shapes[a_of(modules(self.shapes)[0])][0]

    def client_shapes(self, partition_id):
        r = self.rank_of(partition_id)
        out = {k: tuple(truncate(k, np.empty(s, dtype=np.float32), r).shape) if k in self.sends else s
               for k, s in self.shapes.items()}
        return {**out, **self.broadcast}

    def fresh(self, server_round: int, partition_id: int) -> dict[str, np.ndarray]:
        """The new LoRA client ``partition_id`` starts round ``server_round`` from (peft's init, its rank)."""
        full = init_lora(self.shapes, self.sends, self.seed, FRESH_SALT + 7919 * server_round + partition_id)
        return {k: truncate(k, v, self.rank_of(partition_id)).copy() for k, v in full.items()}

    def configure(self, server_round, partition_ids):
        return {pid: {**self.fresh(server_round, pid), **{k: v.copy() for k, v in self.fold.items()}}
                for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        w = weights_of(updates, self.config.weighting)
        trained = []
        for u in updates:
            start = self.fresh(server_round, u.partition_id)
            trained.append({k: start[k].astype(np.float64) + u.deltas[k] for k in self.sends})
        sq = 0.0
        for m in modules(self.shapes):
            b, a = stack([(t[b_of(m)], t[a_of(m)]) for t in trained], w)
            merged = b @ a
            self.fold[fold_of(m)] = (self.fold[fold_of(m)] + merged).astype(np.float32)
            sq += float((merged ** 2).sum())
        return {"merged_norm": sq ** 0.5, "stacked_rank": float(sum(self.rank_of(u.partition_id) for u in updates))}

    def state_dict(self):
        return {"fold": {k: v.copy() for k, v in self.fold.items()}}

    def load_state_dict(self, state):
        if set(state.get("fold", {})) != set(self.fold):
            raise ValueError(f"strategy {self.name!r}: state folds do not match the model")
        self.fold = {k: np.asarray(v, dtype=np.float32).copy() for k, v in state["fold"].items()}

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        sends, personal = cls.tensor_roles(ctx.shapes)
        factors = {k: pad(k, np.asarray(v, dtype=np.float32), ctx.shapes[k]) for k, v in received.items() if k in sends}
        tensors = start_tensors(ctx, factors, state)
        trainable = list(tensors)
        add_folds(ctx, tensors, received)
        losses = fit(ctx, tensors, trainable, ctx.cfg.client.local_epochs)
        rank = {k: (v.shape[0] if k.endswith("lora_A.weight") else v.shape[1]) for k, v in received.items() if k in sends}
        sent_part = {k: truncate(k, v, rank[k]) if k in rank else v for k, v in tensors.items()}
        return finish(ctx, sends, personal, received, sent_part, losses, eval_tensors=tensors)
