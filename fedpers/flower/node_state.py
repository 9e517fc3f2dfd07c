"""A Flower client's personal state (private head, personal prompts) on its node's disk.

Flower keeps ``context.state`` only for the life of one run, so without this a resumed run (or a
restarted SuperNode) would start every head from scratch while the server continued: the resumed run
would not be the run that was interrupted. Each node therefore writes its state after every round
it trains, as safetensors (loading runs no code), under::

    <state folder>/<run state id>/partition_<pid>/round_<r>.safetensors

- the state folder is the node's ``--node-config 'state-dir=DIR'``; under Flower's simulation engine
  (no per-node config) the launcher gives every virtual node ``<run.output_dir>/client_state`` through
  the environment (:data:`SIM_ENV`). The server never sends a path: a node writes only where its
  operator said;
- the run state id is drawn when a run starts and kept in the server checkpoint, so a resumed run
  finds its clients' files and a fresh run never picks up another run's;
- in round ``t`` a client starts from its newest file of a round before ``t``, so when a run is
  resumed from an older checkpoint the rounds it repeats start from the same state as the first time.
  Files no resume can need any more (older than the newest one at or before the last checkpoint
  round) are deleted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

NODE_CONFIG_KEY = "state-dir"
SIM_ENV = "FEDPERS_SIM_STATE_DIR"
_FILE = re.compile(r"round_(\d+)\.safetensors")


class NodeStateStore:
    def __init__(self, root: str | Path, state_id: str):
        if not re.fullmatch(r"[0-9a-f]{8,64}", state_id):  # it names a folder: no path tricks from the wire
            raise ValueError(f"bad state id {state_id!r}")
        self.root = Path(root) / state_id

    def _dir(self, pid: int) -> Path:
        return self.root / f"partition_{int(pid)}"

    def rounds(self, pid: int) -> list[int]:
        d = self._dir(pid)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _FILE.fullmatch(p.name)))

    def load(self, pid: int, server_round: int) -> dict[str, np.ndarray]:
        """The state after the client's last round before ``server_round`` ({} if it has none)."""
        from safetensors.numpy import load_file

        before = [r for r in self.rounds(pid) if r < server_round]
        if not before:
            return {}
        return dict(load_file(str(self._dir(pid) / f"round_{before[-1]}.safetensors")))

    def save(self, pid: int, server_round: int, state: dict[str, np.ndarray], checkpoint_every: int) -> None:
        """Atomically write the state after ``server_round``, then prune what no resume can need."""
        from safetensors.numpy import save_file

        d = self._dir(pid)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"round_{server_round}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)
        # The server's newest checkpoint is at least at the last multiple of checkpoint_every before
        # this round; a resume restarts after it, so it needs the newest file up to there and later ones.
        done = server_round - 1
        floor = (done // checkpoint_every) * checkpoint_every if checkpoint_every else done
        old = [r for r in self.rounds(pid) if r <= floor]
        for r in old[:-1]:
            (d / f"round_{r}.safetensors").unlink(missing_ok=True)


def store_for(node_config: dict, msg_config: dict) -> NodeStateStore | None:
    """The node's store: its own ``state-dir``, else the simulation's folder; None when neither is set
    or the server sent no state id (then state lives in Flower's ``context.state``, for one run)."""
    root = node_config.get(NODE_CONFIG_KEY) or os.environ.get(SIM_ENV, "")
    state_id = str(msg_config.get("state_id") or "")
    if not root or not state_id:
        return None
    return NodeStateStore(str(root), state_id)
