"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, ACL 2025, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Large Language Models", Sec. 3, exact aggregation).

Clients train LoRA factors from the global ones, as in FedIT. The server averages A and B
(``A+ = sum_k w_k A_k``, ``B+ = sum_k w_k B_k``) and folds the error of that average into the frozen
weight:

    W0+ = W0 + s * (sum_k w_k B_k A_k  -  B+ A+)          (s = lora_alpha / r, peft's scaling)

so the next global model is ``W0+ + s B+ A+ = W0 + s sum_k w_k B_k A_k``: exactly the weighted mean of
the client models, which FedIT's ``W0 + s B+ A+`` is not ("the mean of products is not the product of
means").

On our frozen, shared backbone W0 cannot be overwritten: the server keeps the accumulated residual per
LoRA-wrapped module (``<module>.fold.weight``, out x in, in LoRA units; see ``strategies.lora_fold``) and
broadcasts it with A and B every round; the client adds ``s * fold`` to the frozen weight for training
and evaluation and never sends it back. Cost, as in the paper: the residual is a dense out x in matrix
per module, so the download is far larger than the factors (the upload is FedIT's). Weights ``w_k``:
``strategy.weighting``, by default ``uniform``, the paper's: its code averages A, B and the products
B_k A_k with equal weights 1/k (RaghavSinghal10/fedex-lora, ``fed_agg.py`` 95-100:
``sum(B_i @ A_i) / len(client_models)``, ``lora_A_weights.mean(0)``); ``num_examples`` weights by the
clients' training-set sizes. Heads stay personal (the official code also averages the classifier,
``fed_agg.py`` 67-70; here every strategy keeps its head on the client).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies.base import HEAD, ClientUpdate, numel, register_strategy, weights_of
from strategies.lora_baselines import _LoraAvg
from strategies.lora_common import LoraAvgConfig
from strategies.lora_fold import a_of, add_folds, b_of, factor_names, fold_of, fold_shapes, modules, product


@dataclass
class FedExLoraConfig(LoraAvgConfig):
    name: str = "fedex_lora"
    weighting: str = "uniform"  # uniform (the paper's code, fed_agg.py 95-100) | num_examples

    def validate(self) -> None:
        super().validate()
        from strategies._checks import require

        # With a server step other than 1 the averaged factors are not the clients' mean, and the
        # residual that makes the aggregate exact is no longer defined.
        require(self.server_lr == 1.0, "server_lr", f"fedex_lora aggregates exactly only with 1.0, got {self.server_lr}")


@register_strategy
class FedExLora(_LoraAvg):
    name = "fedex_lora"
    summary = "FedAvg of LoRA A and B plus the residual mean(BA) - mean(B)mean(A) folded into the frozen weight (FedEx-LoRA)"
    config_cls = FedExLoraConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return factor_names(shapes), HEAD

    @classmethod
    def broadcast_shapes(cls, config, *, num_clients, shapes):
        return fold_shapes(shapes)

    @classmethod
    def server_state_numel(cls, config, *, num_clients, shapes):
        """The averaged A and B, and the folded residual (out x in per module)."""
        folds = cls.broadcast_shapes(config, num_clients=num_clients, shapes=shapes)
        return super().server_state_numel(config, num_clients=num_clients, shapes=shapes) + numel(folds.values())

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        self.broadcast = type(self).broadcast_shapes(config, num_clients=num_clients, shapes=shapes)
        self.fold = {k: np.zeros(s, dtype=np.float32) for k, s in self.broadcast.items()}

    def configure(self, server_round, partition_ids):
        return {pid: {**self.shared.send(), **{k: v.copy() for k, v in self.fold.items()}} for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        w = weights_of(updates, self.config.weighting)
        before = self.shared.state_dict()
        client = [{k: before[k].astype(np.float64) + u.deltas[k] for k in self.sends} for u in updates]
        metrics = self.shared.apply(updates, self.config.weighting, 1.0)  # A+ and B+: plain averages
        sq = 0.0
        for m in modules(self.shapes):
            mean_of_products = sum(wi * product(c[b_of(m)], c[a_of(m)]) for wi, c in zip(w, client))
            residual = mean_of_products - product(self.shared.tensors[b_of(m)], self.shared.tensors[a_of(m)])
            self.fold[fold_of(m)] = (self.fold[fold_of(m)] + residual).astype(np.float32)
            sq += float((residual ** 2).sum())
        return {**metrics, "residual_norm": sq ** 0.5}

    def state_dict(self):
        return {"shared": self.shared.state_dict(), "fold": {k: v.copy() for k, v in self.fold.items()}}

    def load_state_dict(self, state):
        self.shared.load_state_dict(state["shared"])
        if set(state["fold"]) != set(self.fold):
            raise ValueError(f"strategy {self.name!r}: state folds {sorted(state['fold'])[:2]} do not match the model")
        self.fold = {k: np.asarray(v, dtype=np.float32).copy() for k, v in state["fold"].items()}

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, start_tensors

        tensors = start_tensors(ctx, received, state)
        trainable = list(tensors)
        add_folds(ctx, tensors, received)  # frozen: the residual is the server's
        losses = fit(ctx, tensors, trainable, ctx.cfg.client.local_epochs)
        sends, personal = cls.tensor_roles(ctx.shapes)
        return finish(ctx, sends, personal, received, tensors, losses)
