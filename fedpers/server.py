"""The round loop, engine-agnostic: sample, send, collect, validate, update the strategy, log.

A transport moves payloads to clients addressed by partition id and brings back a :class:`Reply` or
:class:`Failure` per client. Flower's Grid is one transport (simulation and deployment); the
in-process engine is another. Nothing here imports Flower.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from fedpers.config import ExperimentConfig, RunConfig, holdout_count
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


def split_clients(r: RunConfig) -> tuple[list[int], list[int]]:
    """(training, held-out) partition ids; the held-out ones are a seeded draw, so every strategy and
    engine holds out the same clients for a given seed."""
    n_hold = holdout_count(r)
    if n_hold == 0:
        return list(range(r.num_clients)), []
    rng = np.random.default_rng([r.seed, 0x401D])
    held = sorted(int(i) for i in rng.choice(r.num_clients, size=n_hold, replace=False))
    return [i for i in range(r.num_clients) if i not in held], held


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    from fedpers.client import backbone_tensors, client_tensor_shapes
    from fedpers.data.datasets import get_dataset_info
    from strategies import get_strategy_class

    num_classes = get_dataset_info(cfg.data.dataset).num_classes
    shapes = client_tensor_shapes(cfg, num_classes, feature_dim(cfg.model))
    extra = {}
    if get_strategy_class(cfg.strategy.name).trains_backbone:  # the server starts from the pretrained weights
        extra["backbone_state"] = {k: v.numpy() for k, v in backbone_tensors(cfg).items()}
    return create_strategy(
        cfg.strategy,
        num_clients=cfg.run.num_clients,
        shapes=shapes,
        seed=cfg.run.seed,
        init_std=cfg.model.prompt_init_std,
        **extra,
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
            failed.append(Failure(pid, "invalid", f"reply claims partition {r.partition_id}", "partition"))
        else:
            reason = validate_reply(r, strategy.reply_spec(pid), max_bytes)
            if reason is None:
                ok.append(r)
            else:
                failed.append(Failure(pid, "invalid", str(reason), reason.code))
    unexpected = sorted(set(raw) - set(sampled))
    for pid in unexpected:
        log.warning("ignoring reply from unsampled partition %s", pid)
    return ok, failed


def run_server(cfg: ExperimentConfig, transport: Transport, strategy: Strategy | None = None) -> dict:
    """Run every round and write the results folder. Returns the summary dict.

    With ``run.resume`` the loop starts after the round stored in ``<output_dir>/checkpoint.pt``, with
    the strategy, ledger, RNG and (if the transport exports them) client states restored.
    """
    from fedpers import checkpoint, dp

    strategy = strategy or build_strategy(cfg)
    r = cfg.run
    start = 1
    resumed = None
    if r.resume:
        resumed = checkpoint.load_checkpoint(cfg)
        checkpoint.restore(resumed, strategy, transport)
        start = resumed["round"] + 1
        log.info("resuming %s after round %d", r.output_dir, resumed["round"])
    else:
        checkpoint.seed_globals(r.seed)
    ledger = Ledger(cfg, strategy, resume=resumed["ledger"] if resumed else None)
    max_bytes = int(r.max_upload_mb * 1024 * 1024)
    train_ids, unseen_ids = split_clients(r)
    bar = _progress(range(start, r.rounds + 1), r.progress)
    for server_round in bar:
        t0 = time.perf_counter()
        sampled = [train_ids[i] for i in sample_clients(r.seed, server_round, len(train_ids), r.clients_per_round)]
        payloads = strategy.configure(server_round, sampled)
        raw = transport.exchange(server_round, payloads, r.client_timeout_s)
        ok, failed = collect(strategy, sampled, raw, max_bytes)
        applied = len(ok) >= r.min_replies
        server_metrics = {}
        if applied:
            server_metrics = strategy.aggregate(server_round, _updates(ok))
        else:
            log.warning("round %d skipped: %d valid replies < run.min_replies=%d", server_round, len(ok),
                        r.min_replies)
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
        if r.checkpoint_every and (server_round % r.checkpoint_every == 0 or server_round == r.rounds):
            checkpoint.save_checkpoint(cfg, server_round, strategy, ledger, transport)
        _report(bar, row, server_round, r.rounds, ok, sampled, failed)
    if unseen_ids:
        ledger.record_unseen(personalize_unseen(cfg, strategy, transport, unseen_ids, max_bytes))
    if r.cross_eval:
        ledger.record_cross_eval(_cross_eval(cfg, transport, train_ids))
    return ledger.finish(dp.privacy_report(cfg, ledger.rows))


def _cross_eval(cfg: ExperimentConfig, transport: Transport, train_ids: list[int]) -> dict:
    from fedpers import cross_eval

    result = cross_eval.run(cfg, transport, train_ids, cfg.run.rounds + cfg.run.unseen_rounds + 1)
    cross_eval.write(result, Path(cfg.run.output_dir), cfg.strategy.name)
    summary = cross_eval.summarize(result)
    log.info("cross-evaluation: own %s, others %s, gap %s", summary["own_mean"], summary["others_mean"], summary["gap"])
    return summary


def _report(bar, row, server_round, rounds, ok, sampled, failed) -> None:
    msg = (f"round {server_round}/{rounds}: acc mean {row['accuracy_mean']:.3f} "
           f"worst10 {row['accuracy_worst10']:.3f} ok {len(ok)}/{len(sampled)}")
    if failed:
        msg += " failed: " + "; ".join(f"{f.partition_id} {f.kind}: {f.reason}" for f in failed)
    if hasattr(bar, "write"):  # print above the progress bar instead of through it
        bar.set_postfix_str(f"acc {row['accuracy_mean']:.3f}")
        bar.write(msg)
    else:
        log.info(msg)


def _updates(ok: list[Reply]) -> list[ClientUpdate]:
    return [ClientUpdate(u.partition_id, {k.removeprefix("delta/"): v for k, v in u.arrays.items()},
                         u.num_examples, u.metrics) for u in ok]


def personalize_unseen(cfg: ExperimentConfig, strategy: Strategy, transport: Transport, pids: list[int],
                       max_bytes: int) -> dict:
    """After training: each held-out client runs ``run.unseen_rounds`` ordinary client rounds against the
    trained server state, which stays frozen except for what ``Strategy.adapt_unseen`` fits for new
    clients (a generator's descriptor). Data never moves; the accuracy a client reports in its last
    exchange is its unseen-client accuracy."""
    r = cfg.run
    acc: dict[int, float] = {}
    failures: list[dict] = []
    for i in range(1, r.unseen_rounds + 1):
        server_round = r.rounds + i  # distinct seeds from every training round
        payloads = strategy.configure_unseen(server_round, pids)
        raw = transport.exchange(server_round, payloads, r.client_timeout_s)
        ok, failed = collect(strategy, pids, raw, max_bytes)
        failures += [{"round": server_round, "partition_id": f.partition_id, "kind": f.kind, "reason": f.reason}
                     for f in failed]
        acc.update({u.partition_id: float(u.metrics["test_accuracy"]) for u in ok})
        strategy.adapt_unseen(server_round, _updates(ok))
    log.info("unseen clients %s: accuracy mean %.3f", pids, float(np.mean(list(acc.values()))) if acc else float("nan"))
    return {"partition_ids": pids, "per_client": acc, "failures": failures}


def _progress(it, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc="rounds", unit="round", dynamic_ncols=True)
