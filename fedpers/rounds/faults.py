"""Fault injection, for tests and fault drills: clients that raise, hang, stay silent, send garbage, or
send a valid but hostile delta (``poison``).

Two entry points share one vocabulary of faults (:data:`FAULT_KINDS`):

- :class:`FaultyTransport` wraps any transport of the round loop (the in-process engine, a test stub);
- the Flower ClientApp reads ``FEDPERS_FAULTS`` from its environment (``"1:raise,2:nan@3"`` = client 1
  raises every round, client 2 sends NaN in round 3), so the same faults can be rehearsed on a real
  SuperNode or inside Flower's simulation engine. Unset, it does nothing.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from fedpers.payload import Failure, Reply

ENV_VAR = "FEDPERS_FAULTS"
# Faults that corrupt an otherwise good reply, and what each produces.
MALFORMED: dict[str, Callable[[Reply], Reply]] = {
    "nan": lambda r: _map_arrays(r, lambda a: np.full_like(a, np.nan)),
    "inf": lambda r: _map_arrays(r, lambda a: np.full_like(a, np.inf)),
    "shape": lambda r: _map_arrays(r, lambda a: np.zeros(a.shape[::-1] + (2,), a.dtype)),
    "dtype": lambda r: _map_arrays(r, lambda a: a.astype(np.float64)),
    "missing_key": lambda r: dataclasses.replace(r, arrays={}),
    "extra_key": lambda r: dataclasses.replace(r, arrays={**r.arrays, "delta/head": np.zeros(3, np.float32)}),
    "negative_examples": lambda r: dataclasses.replace(r, num_examples=-5),
    "absurd_examples": lambda r: dataclasses.replace(r, num_examples=10**12),
    # Just over the default run.max_upload_mb (64 MiB); a broadcast view, so the drill itself allocates nothing.
    "oversize": lambda r: _map_arrays(r, lambda a: np.broadcast_to(np.zeros((), np.float32), (17 * 2**20,))),
    "wrong_partition": lambda r: dataclasses.replace(r, partition_id=r.partition_id + 10_000),
}
# A reply that passes every check yet is hostile: ``poison`` replaces the client's delta by one of L2 norm
# POISON_NORM (just under the default run.max_delta_norm of 1e4) along one fixed random direction, the same
# every round, so a plain mean moves by about POISON_NORM / n per round (the drill behind
# ``strategy.robust_aggregation`` and ``strategy.norm_bound_relative``). Random, not all-ones: a constant
# shift of every prompt coordinate is undone by the backbone's LayerNorm, and of every head row by argmax.
POISON_NORM = 9.9e3


def _poison(r: Reply) -> Reply:
    rng = np.random.default_rng(0xBAD)
    direction = {k: rng.standard_normal(np.shape(v)) for k, v in sorted(r.arrays.items())}
    norm = np.sqrt(sum(float(np.sum(d**2)) for d in direction.values()))
    scale = POISON_NORM / norm if norm > 0 else 0.0
    return dataclasses.replace(r, arrays={k: (d * scale).astype(np.float32) for k, d in direction.items()})


HOSTILE: dict[str, Callable[[Reply], Reply]] = {"poison": _poison}
# raise: the client throws; hang: it answers only after the deadline; silent: it never answers.
FAULT_KINDS = ("raise", "hang", "silent", *MALFORMED, *HOSTILE)


class InjectedFault(RuntimeError):
    pass


def _map_arrays(r: Reply, fn) -> Reply:
    return dataclasses.replace(r, arrays={k: fn(np.asarray(v)) for k, v in r.arrays.items()})


def corrupt(reply: Reply, kind: str) -> Reply:
    tamper = {**MALFORMED, **HOSTILE}
    if kind not in tamper:
        raise ValueError(f"unknown reply fault {kind!r}; allowed: {', '.join(tamper)}")
    return tamper[kind](reply)


def parse_faults(spec: str) -> dict[tuple[int, int | None], str]:
    """``"1:raise,2:nan@3"`` -> {(1, None): "raise", (2, 3): "nan"} (None = every round)."""
    out: dict[tuple[int, int | None], str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            pid, rest = item.split(":", 1)
            kind, _, rnd = rest.partition("@")
            key = (int(pid), int(rnd) if rnd else None)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: bad item {item!r}; expected PID:KIND or PID:KIND@ROUND") from None
        if kind not in FAULT_KINDS:
            raise ValueError(f"{ENV_VAR}: unknown fault {kind!r}; allowed: {', '.join(FAULT_KINDS)}")
        out[key] = kind
    return out


def fault_for(faults: dict[tuple[int, int | None], str], partition_id: int, server_round: int) -> str | None:
    return faults.get((partition_id, server_round), faults.get((partition_id, None)))


def env_fault(partition_id: int, server_round: int) -> str | None:
    spec = os.environ.get(ENV_VAR, "")
    return fault_for(parse_faults(spec), partition_id, server_round) if spec else None


class FaultyTransport:
    """Wraps a transport; sampled clients with a fault misbehave, the others go through untouched.

    A hanging client really does occupy a thread for ``hang_s`` seconds; the round waits for it only
    until ``timeout`` (``run.client_timeout_s``) and then records a timeout, like a real transport.
    """

    def __init__(self, inner, faults: dict[tuple[int, int | None], str], hang_s: float = 30.0):
        bad = sorted(set(faults.values()) - set(FAULT_KINDS))
        if bad:
            raise ValueError(f"unknown faults {bad}; allowed: {', '.join(FAULT_KINDS)}")
        self.inner, self.faults, self.hang_s = inner, faults, hang_s
        self.log: list[tuple[int, int, str]] = []  # (round, partition, fault) actually injected

    def exchange(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]], timeout: float):
        deadline = time.monotonic() + timeout
        kinds = {pid: fault_for(self.faults, pid, server_round) for pid in payloads}
        for pid, kind in kinds.items():
            if kind:
                self.log.append((server_round, pid, kind))
        hung = {pid: threading.Thread(target=time.sleep, args=(self.hang_s,), daemon=True)
                for pid, k in kinds.items() if k == "hang"}
        for t in hung.values():
            t.start()
        forward = {pid: p for pid, p in payloads.items() if kinds[pid] not in ("raise", "hang", "silent")}
        out = dict(self.inner.exchange(server_round, forward, timeout)) if forward else {}
        for pid, kind in kinds.items():
            if kind == "raise":
                out[pid] = Failure(pid, "error", f"InjectedFault: client {pid} raised in round {server_round}")
            elif (kind in MALFORMED or kind in HOSTILE) and isinstance(out.get(pid), Reply):
                out[pid] = corrupt(out[pid], kind)
        for pid, t in hung.items():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                out[pid] = Failure(pid, "timeout", f"no reply within run.client_timeout_s={timeout}")
        return out

    # Checkpoints see through the wrapper to the clients' states.
    def state_dict(self):
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else None

    def load_state_dict(self, states) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(states)
