"""One client's round, dispatched to its strategy: the layer above both the client blocks
(:mod:`fedpers.client`) and the strategies that compose them. Engines (in-process, Flower) call
:func:`client_round`; the client blocks never look a strategy up by name."""

from __future__ import annotations

import numpy as np

from fedpers.client import make_context
from fedpers.config import ExperimentConfig
from fedpers.data import ClientData
from fedpers.dp import privatize_reply
from fedpers.payload import Reply
from strategies import get_strategy_class


def client_round(
    cfg: ExperimentConfig,
    partition_id: int,
    server_round: int,
    received: dict[str, np.ndarray],
    state: dict[str, np.ndarray],
    data: ClientData | None = None,
) -> tuple[Reply, dict[str, np.ndarray]]:
    """``data``: the device's own data (deployment); None = this partition of the simulated federation."""
    from fedpers.results import cross_eval

    strategy_cls = get_strategy_class(cfg.strategy.name)
    ctx = make_context(cfg, partition_id, server_round, data)
    ctx.scorer = strategy_cls.evaluate_model  # the validation split is scored as the strategy scores test
    if cross_eval.CONTROL in received:  # not a training round: upload or score personal models
        return cross_eval.client_op(ctx, strategy_cls, received, state), state
    reply, state = strategy_cls.client_update(ctx, received, state)
    reply.arrays = privatize_reply(cfg, reply.arrays, server_round, partition_id)  # identity unless dp.clip_norm > 0
    return reply, state
