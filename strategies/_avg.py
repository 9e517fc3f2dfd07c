"""FedAvg machinery shared by the averaging strategies: the server keeps one global copy of every
tensor in ``sends`` and adds the weighted mean of the clients' deltas to it.

With ``server_lr = 1`` and ``weighting = num_examples`` this is exactly FedAvg (McMahan et al., 2017):
the new global tensor is the example-weighted mean of the clients' trained tensors.
``robust_aggregation`` / ``norm_bound_relative`` replace the mean by a coordinate-wise median or trimmed
mean and clip each delta to a multiple of the round's median delta norm (:mod:`strategies._robust`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strategies._checks import require, require_choice
from strategies._robust import ROBUST_AGGREGATIONS, robust_combine
from strategies.base import ClientUpdate, Strategy, StrategyConfig, weights_of

PERSONAL = "personal."  # prefix of a client's private copy of a tensor it also sends (Ditto, APFL)


@dataclass
class AveragingConfig(StrategyConfig):
    server_lr: float = 1.0  # global tensors += server_lr * weighted mean of client deltas (1 = FedAvg)
    weighting: str = "num_examples"  # num_examples | uniform
    robust_aggregation: str = "none"  # none (weighted mean) | median | trimmed_mean: coordinate-wise over the round's client deltas, unweighted (Flower's FedMedian / FedTrimmedAvg)
    trim_fraction: float = 0.2  # robust_aggregation=trimmed_mean: per coordinate, floor(trim_fraction * n) of the n deltas cut from each end (Flower's beta), in [0, 0.5)
    norm_bound_relative: float = 0.0  # > 0: scale each client delta down to at most this many times the round's median delta norm before aggregating (0 = off)

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.weighting, "weighting", ("num_examples", "uniform"))
        require_choice(self.robust_aggregation, "robust_aggregation", ROBUST_AGGREGATIONS)
        require(0 <= self.trim_fraction < 0.5, "trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        require(
            self.trim_fraction == 0.2 or self.robust_aggregation == "trimmed_mean",
            "trim_fraction",
            f"only applies with strategy.robust_aggregation=trimmed_mean (got {self.robust_aggregation!r})",
        )
        require(
            self.norm_bound_relative >= 0,
            "norm_bound_relative",
            f"must be >= 0 (0 = off), got {self.norm_bound_relative}",
        )


class Averaging(Strategy):
    """Global tensors for everything in ``sends``; subclasses choose ``sends``/``personal`` and, where
    the local objective differs, ``client_update``."""

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5, backbone_state=None):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        rng = np.random.default_rng([seed, 0xF5])
        self.global_tensors: dict[str, np.ndarray] = {}
        for k in self.sends:
            shape = shapes[k]
            if k in ("prompts", "deep_prompts"):
                t = rng.standard_normal(shape) * init_std
            elif k.startswith("backbone."):
                if backbone_state is None or k not in backbone_state:
                    raise ValueError(f"strategy {self.name!r} sends {k} but got no pretrained value for it")
                t = np.asarray(backbone_state[k])
            else:  # heads start at zero, as a client's own head does
                t = np.zeros(shape)
            self.global_tensors[k] = np.asarray(t, dtype=np.float32).copy()

    def configure(self, server_round, partition_ids):
        return {pid: {k: v.copy() for k, v in self.global_tensors.items()} for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        c = self.config
        w = weights_of(updates, c.weighting)
        agg, metrics = robust_combine(
            [u.deltas for u in updates], w, self.sends, c.robust_aggregation, c.trim_fraction, c.norm_bound_relative
        )
        sq = 0.0
        for k in self.sends:
            self.global_tensors[k] = (self.global_tensors[k] + c.server_lr * agg[k]).astype(np.float32)
            sq += float(np.sum(agg[k] ** 2))
        return {"delta_norm": sq**0.5, **metrics}

    def state_dict(self):
        return {"global": {k: v.copy() for k, v in self.global_tensors.items()}}

    def load_state_dict(self, state):
        got = set(state.get("global", {}))
        if got != set(self.sends):
            raise ValueError(f"strategy {self.name!r}: state has tensors {sorted(got)}, expected {sorted(self.sends)}")
        self.global_tensors = {k: np.asarray(v, dtype=np.float32).copy() for k, v in state["global"].items()}


def as_torch(arrays: dict[str, np.ndarray], names) -> dict[str, torch.Tensor]:
    """Fresh float32 torch copies of ``arrays[name]`` for each name."""
    return {k: torch.from_numpy(np.array(arrays[k], dtype=np.float32)) for k in names}


def sq_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of ||a - b||^2 (keys of ``b``)."""
    return sum(((a[k] - b[k]) ** 2).sum() for k in b)
