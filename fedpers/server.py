"""The round loop, engine-agnostic: sample, send, collect, validate, update the strategy, log.

A transport moves payloads to clients addressed by partition id and brings back a :class:`Reply` or
:class:`Failure` per client. Flower's Grid is one transport (simulation and deployment); the
in-process engine is another. Nothing here imports Flower.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from fedpers.config import ExperimentConfig
from fedpers.models.backbones import feature_dim
from fedpers.payload import Failure, Reply, serialized_nbytes, validate_reply
from fedpers.results import Ledger
from strategies import ClientUpdate, Strategy, create_strategy

log = logging.getLogger("fedpers")


class Transport(Protocol):
    def exchange(
        self, server_round: int, payloads: dict[int, dict[str, np.ndarray]], timeout: float
    ) -> dict[int, Reply | Failure]:
        """Send each partition its payload; return whatever came back, keyed by partition id."""


def sample_clients(seed: int, server_round: int, num_clients: int, per_round: int) -> list[int]:
    """Seeded sampling without replacement, sorted so every later step is order-independent."""
    if per_round == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round, 0x5A])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    from fedpers.client import client_tensor_shapes
    from fedpers.data.datasets import get_dataset_info

    num_classes = get_dataset_info(cfg.data.dataset).num_classes
    shapes = client_tensor_shapes(cfg, num_classes, feature_dim(cfg.model))
    return create_strategy(
        cfg.strategy,
        num_clients=cfg.run.num_clients,
        shapes=shapes,
        seed=cfg.run.seed,
        init_std=cfg.model.prompt_init_std,
    )


def collect(
    strategy: Strategy, sampled: list[int], raw: dict[int, Reply | Failure], max_bytes: int
) -> tuple[list[Reply], list[Failure]]:
    """Validate replies; anything unusable becomes a Failure with its reason. Sorted by partition id."""
    ok: list[Reply] = []
    failed: list[Failure] = []
    for pid in sorted(sampled):
        r = raw.get(pid)
        if r is None:
            failed.append(Failure(pid, "missing", "no reply"))
        elif isinstance(r, Failure):
            failed.append(r)
        elif r.partition_id != pid:
            failed.append(Failure(pid, "invalid", f"reply claims partition {r.partition_id}"))
        else:
            reason = validate_reply(r, strategy.reply_spec(pid), max_bytes)
            if reason is None:
                ok.append(r)
            else:
                failed.append(Failure(pid, "invalid", reason))
    unexpected = sorted(set(raw) - set(sampled))
    for pid in unexpected:
        log.warning("ignoring reply from unsampled partition %s", pid)
    return ok, failed


def run_server(cfg: ExperimentConfig, transport: Transport, strategy: Strategy | None = None) -> dict:
    """Run every round and write the results folder. Returns the summary dict."""
    strategy = strategy or build_strategy(cfg)
    ledger = Ledger(cfg, strategy)
    max_bytes = int(cfg.run.max_upload_mb * 1024 * 1024)
    r = cfg.run
    rounds = range(1, r.rounds + 1)
    bar = _progress(rounds, r.progress)
    for server_round in bar:
        t0 = time.perf_counter()
        sampled = sample_clients(r.seed, server_round, r.num_clients, r.clients_per_round)
        payloads = strategy.configure(server_round, sampled)
        raw = transport.exchange(server_round, payloads, r.client_timeout_s)
        ok, failed = collect(strategy, sampled, raw, max_bytes)
        applied = len(ok) >= r.min_replies
        server_metrics = {}
        if applied:
            server_metrics = strategy.aggregate(
                server_round,
                [ClientUpdate(u.partition_id, {k.removeprefix("delta/"): v for k, v in u.arrays.items()},
                              u.num_examples, u.metrics) for u in ok],
            )
        row = ledger.record_round(
            server_round,
            sampled=sampled,
            ok=ok,
            failed=failed,
            applied=applied,
            bytes_down={pid: serialized_nbytes(payloads[pid]) for pid in sampled},
            server_metrics=server_metrics,
            seconds=time.perf_counter() - t0,
        )
        msg = (f"round {server_round}/{r.rounds}: acc mean {row['accuracy_mean']:.3f} "
               f"worst10 {row['accuracy_worst10']:.3f} ok {len(ok)}/{len(sampled)}")
        if failed:
            msg += " failed: " + "; ".join(f"{f.partition_id} {f.kind}: {f.reason}" for f in failed)
        if hasattr(bar, "write"):  # print above the progress bar instead of through it
            bar.set_postfix_str(f"acc {row['accuracy_mean']:.3f}")
            bar.write(msg)
        else:
            log.info(msg)
    return ledger.finish()


def _progress(it, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc="rounds", unit="round", dynamic_ncols=True)
