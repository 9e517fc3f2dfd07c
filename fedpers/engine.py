"""The in-process engine: the same round loop and client code, called directly in this process.

Client state lives in a dict keyed by partition id, as Flower keeps it in each node's context.
"""

from __future__ import annotations

import logging

import numpy as np

from fedpers.client import client_round
from fedpers.config import ExperimentConfig
from fedpers.payload import Failure, Reply

log = logging.getLogger("fedpers")


class InProcessTransport:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.states: dict[int, dict[str, np.ndarray]] = {}

    def exchange(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]], timeout: float):
        out: dict[int, Reply | Failure] = {}
        for pid, arrays in payloads.items():
            try:
                reply, state = client_round(self.cfg, pid, server_round, arrays, self.states.get(pid, {}))
            except Exception as e:  # a failing client must not stop the round; its reason is recorded
                log.exception("client %s failed in round %s", pid, server_round)
                out[pid] = Failure(pid, "error", f"{type(e).__name__}: {e}")
                continue
            self.states[pid] = state
            out[pid] = reply
        return out

    def state_dict(self) -> dict[int, dict[str, np.ndarray]]:
        """Every client's personal state (heads, personal prompts), for checkpoints."""
        return {pid: {k: np.array(v, copy=True) for k, v in s.items()} for pid, s in self.states.items()}

    def load_state_dict(self, states: dict[int, dict[str, np.ndarray]]) -> None:
        self.states = {int(pid): {k: np.array(v, copy=True) for k, v in s.items()} for pid, s in states.items()}
