"""The fast engine (``run.engine=fast``; ``inprocess`` is the same engine under its old name).

The same round loop, strategies and client code as the Flower engine, called directly in this process:
no messages, no serialisation, no worker processes. Client state lives in a dict keyed by partition id,
as Flower keeps it in each node's context, and holds only the small personal tensors; the data and
the frozen backbone are loaded once per process and indexed per client (as in every engine).

Speed comes from what it does not do (per-message machinery), from the exact caches in
``fedpers.cache`` (shared with the Flower engine's workers) and, with ``run.batch_clients``, from
training a round's clients together (``fedpers.batched``).
"""

from __future__ import annotations

import logging

import numpy as np

from fedpers.client import client_round, make_context, privatize_reply
from fedpers.config import ExperimentConfig
from fedpers.payload import Failure, Reply
from strategies import get_strategy_class

log = logging.getLogger("fedpers")


class InProcessTransport:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.states: dict[int, dict[str, np.ndarray]] = {}
        self._warned = False

    def exchange(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]], timeout: float):
        if self.cfg.run.batch_clients and payloads:
            return self._exchange_batched(server_round, payloads)
        return {pid: self._one(server_round, pid, arrays) for pid, arrays in payloads.items()}

    def _one(self, server_round: int, pid: int, arrays: dict[str, np.ndarray]) -> Reply | Failure:
        try:
            reply, state = client_round(self.cfg, pid, server_round, arrays, self.states.get(pid, {}))
        except Exception as e:  # a failing client must not stop the round; its reason is recorded
            log.exception("client %s failed in round %s", pid, server_round)
            return Failure(pid, "error", f"{type(e).__name__}: {e}")
        self.states[pid] = state
        return reply

    def _exchange_batched(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]]):
        from fedpers import batched

        strategy_cls = get_strategy_class(self.cfg.strategy.name)
        pids = sorted(payloads)
        ctxs = [make_context(self.cfg, pid, server_round) for pid in pids]
        if not batched.supported(strategy_cls, ctxs[0]):
            if not self._warned:
                log.warning("run.batch_clients: strategy %r has its own client objective (or the model is not "
                            "a shallow-prompt ViT); training its clients one at a time", strategy_cls.name)
                self._warned = True
            return {pid: self._one(server_round, pid, payloads[pid]) for pid in pids}
        r, c = self.cfg.run, self.cfg.client
        sizes = [min(c.batch_size, ctx.data.num_train) for ctx in ctxs]
        out: dict[int, Reply | Failure] = {}
        for group in batched.group_clients(sizes, r.batch_max_samples):
            g_pids = [pids[i] for i in group]
            try:
                results = batched.train_group(strategy_cls, [ctxs[i] for i in group],
                                              [payloads[p] for p in g_pids],
                                              [self.states.get(p, {}) for p in g_pids], r.device)
            except Exception:  # one bad client must not fail its group: redo it one client at a time
                log.exception("batched training failed in round %s; retrying clients %s one at a time",
                              server_round, g_pids)
                out.update({p: self._one(server_round, p, payloads[p]) for p in g_pids})
                continue
            for p, (reply, state) in zip(g_pids, results):
                # As client_round does after every client update (identity unless dp.clip_norm > 0).
                reply.arrays = privatize_reply(self.cfg, reply.arrays, server_round, p)
                self.states[p] = state
                out[p] = reply
        return out

    def state_dict(self) -> dict[int, dict[str, np.ndarray]]:
        """Every client's personal state (heads, personal prompts), for checkpoints."""
        return {pid: {k: np.array(v, copy=True) for k, v in s.items()} for pid, s in self.states.items()}

    def load_state_dict(self, states: dict[int, dict[str, np.ndarray]]) -> None:
        self.states = {int(pid): {k: np.array(v, copy=True) for k, v in s.items()} for pid, s in states.items()}
