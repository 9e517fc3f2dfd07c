"""The fast engine (``run.engine=fast``; ``inprocess`` is the same engine under its old name).

The same round loop, strategies and client code as the Flower engine, called directly in this process:
no messages, no serialisation, no worker processes. Client state lives in a dict keyed by partition id,
as Flower keeps it in each node's context, and holds only the small personal tensors; the data and
the frozen backbone are loaded once per process and indexed per client (as in every engine).

Speed comes from what it does not do (per-message machinery), from the exact caches in
``fedpers.models.cache`` (shared with the Flower engine's workers), with ``run.workers=N`` from training a
round's clients in N processes (each with its share of the cores: small clients cannot keep many
threads busy in one forward pass), and with ``run.batch_clients`` from training a round's clients
together (``fedpers.rounds.batched``; meant for GPUs).

With workers, client state still lives here and travels with each call (it is only the personal
tensors); each worker loads the data and the backbone once and keeps its own exact caches. When a
worker dies, the pool is restarted and the clients it took down are retried once; a client that kills
its worker again is recorded as failed for that round. The fast engine does not enforce
``run.client_timeout_s``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from fedpers.client import make_context
from fedpers.config import ExperimentConfig
from fedpers.dp import privatize_reply
from fedpers.payload import Failure, Reply
from fedpers.rounds.client_round import client_round
from fedpers.rounds.threads import ThreadPolicy, torch_threads
from fedpers.rounds.workers import watch_parent
from strategies import get_strategy_class

log = logging.getLogger("fedpers")


class InProcessTransport:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.states: dict[int, dict[str, np.ndarray]] = {}
        self._warned = False
        self._pool: ProcessPoolExecutor | None = None
        # With workers, this process only waits; the workers' threads are set when the pool starts.
        self.threads = ThreadPolicy(cfg.run.threads) if cfg.run.workers == 1 else None

    def exchange(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]], timeout: float):
        from fedpers.results import cross_eval

        if cross_eval.is_control(payloads):  # evaluation only: no batched training path applies
            return {pid: self._one(server_round, pid, arrays) for pid, arrays in payloads.items()}
        if self.threads is not None:
            self.threads.update()
        if self.cfg.run.batch_clients and payloads:
            return self._exchange_batched(server_round, payloads)
        if self.cfg.run.workers > 1 and payloads:
            return self._exchange_pool(server_round, payloads)
        return {pid: self._one(server_round, pid, arrays) for pid, arrays in payloads.items()}

    def _exchange_pool(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]]):
        """Clients whose worker died (between rounds, or under them) are retried once on a fresh pool;
        a client that takes its worker down twice fails for this round."""
        out: dict[int, Reply | Failure] = {}
        todo = dict(payloads)
        for attempt in (1, 2):
            died = self._run_pool(server_round, todo, out)
            if not died:
                break
            log.warning("a fast-engine worker process died in round %s (clients %s); restarting the pool%s",
                        server_round, sorted(died), "" if attempt == 2 else " and retrying them")
            self.close()
            todo = {pid: payloads[pid] for pid in died}
        return {pid: out[pid] for pid in payloads}

    def _run_pool(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]],
                  out: dict[int, Reply | Failure]) -> list[int]:
        """Run ``payloads`` on the pool into ``out``; the clients whose worker died (Failure in ``out``)."""
        if self._pool is None:
            n = self.cfg.run.workers
            threads = torch_threads(jobs=n, requested=self.cfg.run.threads)
            log.info("fast engine: %d worker processes x %d torch threads", n, threads)
            self._pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(threads, os.getpid()))
        died = []
        futures = {}
        for pid, arrays in payloads.items():
            try:
                futures[pid] = self._pool.submit(_remote_round, self.cfg, pid, server_round, arrays,
                                                 self.states.get(pid, {}))
            except BrokenProcessPool as e:
                died.append(pid)
                out[pid] = Failure(pid, "error", f"worker process died: {e}")
        for pid, fut in futures.items():
            try:
                result = fut.result()
            except BrokenProcessPool as e:
                died.append(pid)
                out[pid] = Failure(pid, "error", f"worker process died: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be unpickled: this client only
                out[pid] = Failure(pid, "error", f"{type(e).__name__}: {e}")
                continue
            if isinstance(result, Failure):
                out[pid] = result
            else:
                out[pid], self.states[pid] = result
        return died

    def close(self) -> None:
        """Stop the worker processes (if any); the transport can still be used (they restart)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _one(self, server_round: int, pid: int, arrays: dict[str, np.ndarray]) -> Reply | Failure:
        result = _remote_round(self.cfg, pid, server_round, arrays, self.states.get(pid, {}))
        if isinstance(result, Failure):
            return result
        reply, self.states[pid] = result
        return reply

    def _exchange_batched(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]]):
        from fedpers.rounds import batched

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


def _init_worker(threads: int, parent_pid: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    watch_parent(parent_pid)  # an engine whose process dies takes its workers with it


def _remote_round(cfg: ExperimentConfig, pid: int, server_round: int, arrays: dict[str, np.ndarray],
                  state: dict[str, np.ndarray]):
    """One client round (in this process or a worker): (Reply, new state), or a Failure naming the exception."""
    try:
        return client_round(cfg, pid, server_round, arrays, state)
    except Exception as e:  # a failing client must not stop the round; its reason is recorded
        log.exception("client %s failed in round %s", pid, server_round)
        return Failure(pid, "error", f"{type(e).__name__}: {e}")
