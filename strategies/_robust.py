"""Robust aggregation of client deltas for the averaging strategies (``strategy.robust_aggregation``,
``strategy.trim_fraction``, ``strategy.norm_bound_relative``).

``run.max_delta_norm`` rejects a reply whose delta is absurd in absolute terms; a client may still send,
every round, a delta just under that bound, and one such client among N moves a weighted mean by
``norm / N`` per round. The rules here bound what one client can do relative to the others:

- ``median``: the coordinate-wise median of the deltas (Yin et al., "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018), as Flower's ``FedMedian``
  (``flwr.server.strategy.aggregate.aggregate_median``: ``np.median(layer, axis=0)``, ignoring
  ``num_examples``). With an even count it is the mean of the two middle values.
- ``trimmed_mean``: the coordinate-wise beta-trimmed mean (same paper), as Flower's ``FedTrimmedAvg``
  (``aggregate.py`` ``_trim_mean``, after ``scipy.stats.trim_mean``): per coordinate, the
  ``floor(beta * n)`` smallest and largest of the ``n`` values are dropped and the rest averaged
  (unweighted); ``beta`` in [0, 0.5), Flower's default 0.2.
- ``norm_bound_relative = c > 0``: before aggregating, each client's delta (all its tensors jointly) is
  scaled by ``min(1, c * median_i ||delta_i|| / ||delta||)`` -- Flower's ``clip_inputs_inplace``
  (``flwr.supercore.differential_privacy``, FlatClip) with the round's median delta norm times ``c`` as the
  clipping norm, the quantile-0.5 bound of adaptive clipping (Andrew et al., "Differentially Private
  Learning with Adaptive Clipping", NeurIPS 2021) taken from the round itself; norm bounding as a defence:
  Sun et al., "Can You Really Backdoor Federated Learning?", 2019.

The server adds the deltas to the global tensors every client received, so the median or trimmed mean
of the deltas plus the global tensor is the median or trimmed mean of the clients' trained tensors,
which is what Flower's strategies aggregate.
"""

from __future__ import annotations

import math

import numpy as np

ROBUST_AGGREGATIONS = ("none", "median", "trimmed_mean")


def joint_norm(delta: dict[str, np.ndarray]) -> float:
    """L2 norm of all of one client's tensors together (as ``fedpers.payload.delta_norm``)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta.values()))


def clip_to_median_norm(
    deltas: list[dict[str, np.ndarray]], c: float
) -> tuple[list[dict[str, np.ndarray]], int, float]:
    """Each delta scaled to at most ``c`` times the median of the deltas' joint norms.
    Returns (clipped deltas, how many were scaled down, the bound)."""
    norms = [joint_norm(d) for d in deltas]
    bound = c * float(np.median(norms))
    out, clipped = [], 0
    for d, n in zip(deltas, norms):
        scale = min(1.0, bound / n) if n > 0 else 1.0
        clipped += scale < 1.0
        out.append({k: v * scale for k, v in d.items()})
    return out, clipped, bound


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 (one row per client), as ``aggregate_median``."""
    return np.median(stack, axis=0)


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Mean over axis 0 of what is left after dropping the ``floor(beta * n)`` smallest and largest values
    of every coordinate: Flower's ``_trim_mean`` line for line."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    n = stack.shape[0]
    low = int(beta * n)
    high = n - low
    part = np.partition(stack, (low, high - 1), axis=0)
    return np.mean(part[low:high], axis=0)


def robust_combine(
    deltas: list[dict[str, np.ndarray]], weights: np.ndarray, names, rule: str, beta: float, c: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The aggregate delta of every tensor in ``names`` (float64) and server metrics.

    ``rule``: ``none`` = the ``weights``-weighted mean (FedAvg); ``median`` / ``trimmed_mean`` ignore the
    weights, as Flower's FedMedian and FedTrimmedAvg ignore ``num_examples``. ``c > 0`` clips first."""
    metrics: dict[str, float] = {}
    deltas = [{k: np.asarray(d[k], dtype=np.float64) for k in names} for d in deltas]
    if c > 0:
        deltas, clipped, bound = clip_to_median_norm(deltas, c)
        metrics.update({"robust_clipped": float(clipped), "robust_norm_bound": bound})
    if rule == "trimmed_mean":
        metrics["robust_trimmed_per_end"] = float(int(beta * len(deltas)))
    out = {}
    for k in names:
        if rule == "none":
            out[k] = sum(wi * d[k] for wi, d in zip(weights, deltas))
        elif rule == "median":
            out[k] = coordinate_median(np.stack([d[k] for d in deltas]))
        elif rule == "trimmed_mean":
            out[k] = trimmed_mean(np.stack([d[k] for d in deltas]), beta)
        else:
            raise ValueError(f"unknown robust aggregation {rule!r}; allowed: {', '.join(ROBUST_AGGREGATIONS)}")
    return out, metrics
