"""The round loop, engine-agnostic: sample, send, collect, validate, update the strategy, log.

A transport moves payloads to clients addressed by partition id and brings back a :class:`Reply` or
:class:`Failure` per client. Flower's Grid is one transport (simulation and deployment); the
in-process engine is another. Nothing here imports Flower.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from fedpers.config import ExperimentConfig
from fedpers.experiment import split_clients
from fedpers.payload import Failure, Reply, serialized_nbytes, validate_reply
from fedpers.results.ledger import Ledger
from strategies import ClientUpdate, Strategy

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
    """A fresh server-side strategy for ``cfg`` (:meth:`fedpers.experiment.Experiment.new_strategy`)."""
    from fedpers.experiment import build

    return build(cfg).new_strategy()


def collect(
    strategy: Strategy, sampled: list[int], raw: dict[int, Reply | Failure], max_bytes: int,
    max_norm: float = math.inf,
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
        elif not isinstance(r, Reply):
            failed.append(Failure(pid, "invalid", f"not a reply: {type(r).__name__}", "type"))
        elif r.partition_id != pid:
            failed.append(Failure(pid, "invalid", f"reply claims partition {r.partition_id}", "partition"))
        else:
            reason = validate_reply(r, strategy.reply_spec(pid), max_bytes, max_norm)
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
    from fedpers import dp
    from fedpers.results import checkpoint, run_folder

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
        ok, failed = collect(strategy, sampled, raw, max_bytes, r.max_delta_norm)
        applied = len(ok) >= r.min_replies
        server_metrics, rejected = {}, None
        if applied:
            server_metrics, rejected = guarded_aggregate(strategy, server_round, _updates(ok, r.max_num_examples))
            applied = rejected is None
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
            rejected=rejected,
        )
        if r.checkpoint_every and (server_round % r.checkpoint_every == 0 or server_round == r.rounds):
            checkpoint.save_checkpoint(cfg, server_round, strategy, ledger, transport)
        run_folder.first_round_done(r.output_dir)  # a replaced run's old folder goes now, not before
        _report(bar, row, server_round, r.rounds, ok, sampled, failed)
    if unseen_ids:
        ledger.record_unseen(personalize_unseen(cfg, strategy, transport, unseen_ids, max_bytes))
    if r.cross_eval:
        ledger.record_cross_eval(_cross_eval(cfg, transport, train_ids, set(ledger.last_acc)))
    return ledger.finish(dp.privacy_report(cfg, ledger.rows))


def _cross_eval(cfg: ExperimentConfig, transport: Transport, train_ids: list[int], trained: set[int]) -> dict:
    """Every trained client's model on every client (``run.cross_eval_clients=0``), or N of the clients
    that trained, drawn by ``run.seed``, on each other (N x N)."""
    from fedpers.results import cross_eval

    models, data = train_ids, None
    n = cfg.run.cross_eval_clients
    if n:
        models = data = cross_eval.sample_clients(cfg.run.seed, [p for p in train_ids if p in trained], n)
    result = cross_eval.run(cfg, transport, models, cfg.run.rounds + cfg.run.unseen_rounds + 1, data_ids=data)
    cross_eval.write(result, Path(cfg.run.output_dir), cfg.strategy.name)
    summary = cross_eval.summarize(result, llm=cfg.model.modality == "llm")
    log.info("cross-evaluation: own %s, others %s, gap %s", summary["own_mean"], summary["others_mean"], summary["gap"])
    return summary


def _report(bar, row, server_round, rounds, ok, sampled, failed) -> None:
    msg = (f"round {server_round}/{rounds}: acc mean {row['accuracy_mean']:.3f} "
           f"weighted {row['accuracy_weighted']:.3f} worst10 {row['accuracy_worst10']:.3f} "
           f"test loss {row['test_loss_mean']:.4f} ok {len(ok)}/{len(sampled)}")
    if failed:
        msg += " failed: " + "; ".join(f"{f.partition_id} {f.kind}: {f.reason}" for f in failed)
    if hasattr(bar, "write"):  # print above the progress bar instead of through it
        bar.set_postfix_str(f"acc {row['accuracy_mean']:.3f}")
        bar.write(msg)
    else:
        log.info(msg)


def _updates(ok: list[Reply], max_examples: int | None = None) -> list[ClientUpdate]:
    """Replies as strategy updates; a claimed ``num_examples`` above ``max_examples``
    (``run.max_num_examples``) counts as that many, so no client can buy the aggregate's weight."""
    cap = max_examples or math.inf
    return [ClientUpdate(u.partition_id, {k.removeprefix("delta/"): v for k, v in u.arrays.items()},
                         int(min(u.num_examples, cap)), u.metrics) for u in ok]


def state_is_finite(state) -> bool:
    """Every tensor/array (and float) anywhere in a strategy ``state_dict`` is finite."""
    if isinstance(state, dict):
        return all(state_is_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(state_is_finite(v) for v in state)
    if isinstance(state, np.ndarray):
        return not np.issubdtype(state.dtype, np.inexact) or bool(np.isfinite(state).all())
    if isinstance(state, float):
        return math.isfinite(state)
    if hasattr(state, "isfinite"):  # torch tensors, without importing torch here
        return not state.is_floating_point() or bool(state.isfinite().all())
    return True


def guarded_aggregate(strategy: Strategy, server_round: int,
                      updates: list[ClientUpdate]) -> tuple[dict, dict | None]:
    """``strategy.aggregate``, rolled back when it leaves a non-finite server state (valid replies can
    still overflow together, or through the optimizer). Returns (server metrics, None) when applied,
    else ({}, {"reason", "partition_ids"}) naming the clients whose update alone also breaks the state
    (all of them when none does alone)."""
    before = strategy.state_dict()
    metrics = strategy.aggregate(server_round, updates)
    if state_is_finite(strategy.state_dict()):
        return metrics, None
    strategy.load_state_dict(before)
    offending = []
    for u in updates:  # rare path: find who did it, one update at a time, always from the same state
        strategy.aggregate(server_round, [u])
        if not state_is_finite(strategy.state_dict()):
            offending.append(u.partition_id)
        strategy.load_state_dict(before)
    offending = offending or [u.partition_id for u in updates]
    log.warning("round %d rolled back: the aggregate made the server state non-finite (clients %s)",
                server_round, offending)
    return {}, {"reason": "nonfinite_state", "partition_ids": offending}


def personalize_unseen(cfg: ExperimentConfig, strategy: Strategy, transport: Transport, pids: list[int],
                       max_bytes: int) -> dict:
    """After training: each held-out client runs ``run.unseen_rounds`` ordinary client rounds against the
    trained server state, which stays frozen except for what ``Strategy.adapt_unseen`` fits for new
    clients (a generator's descriptor). Data never moves; the accuracy a client reports in its last
    exchange is its unseen-client accuracy."""
    r = cfg.run
    acc: dict[int, float] = {}
    loss: dict[int, float] = {}
    failures: list[dict] = []
    for i in range(1, r.unseen_rounds + 1):
        server_round = r.rounds + i  # distinct seeds from every training round
        payloads = strategy.configure_unseen(server_round, pids)
        raw = transport.exchange(server_round, payloads, r.client_timeout_s)
        ok, failed = collect(strategy, pids, raw, max_bytes, r.max_delta_norm)
        failures += [{"round": server_round, "partition_id": f.partition_id, "kind": f.kind, "reason": f.reason}
                     for f in failed]
        acc.update({u.partition_id: float(u.metrics["test_accuracy"]) for u in ok})
        loss.update({u.partition_id: float(u.metrics["test_loss"]) for u in ok})
        strategy.adapt_unseen(server_round, _updates(ok, r.max_num_examples))
    log.info("unseen clients %s: accuracy mean %.3f", pids, float(np.mean(list(acc.values()))) if acc else float("nan"))
    return {"partition_ids": pids, "per_client": acc, "per_client_loss": loss, "failures": failures}


def _progress(it, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc="rounds", unit="round", dynamic_ncols=True)
