"""FlowerTransport against a fake Grid: fewer replies than messages, error replies, malformed replies,
duplicate or absent nodes. Fast: no Ray, no SuperLink."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpers.flower.apps import FlowerRunError, FlowerTransport, _to_record
from fedpers.rounds.server import build_strategy, collect

METRICS = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.5, "num_test": 4.0}
BAD_NUMBERS = {"inf_examples": ("num_examples", float("inf")), "frac_examples": ("num_examples", 5.9),
               "inf_pid": ("partition_id", float("inf")), "nan_examples": ("num_examples", float("nan"))}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Messages can only be built inside a Flower task; pretend to be the ServerApp of run 1.
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Nodes 100+pid serve partition pid; ``behaviour[pid]`` in ok | error | silent | malformed."""

    def __init__(self, behaviour: dict[int, str], claims: dict[int, int] | None = None):
        self.behaviour = behaviour
        self.claims = claims or {100 + p: p for p in behaviour}
        self.timeouts: list[float] = []

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, msgs, timeout):
        self.timeouts.append(timeout)
        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if m.metadata.message_type == "query":
                out.append(Message(RecordDict({"info": ConfigRecord({"partition-id": self.claims[node]})}),
                                   reply_to=m))
                continue
            pid = self.claims[node]
            kind = self.behaviour[pid]
            if kind == "silent":
                continue  # never answers: send_and_receive returns fewer replies than messages
            if kind == "error":
                out.append(Message(Error(code=0, reason="ClientApp raised ZeroDivisionError"), reply_to=m))
                continue
            delta = {"delta/prompts": np.zeros_like(m.content["arrays"]["prompts"].numpy())}
            metrics = {**METRICS, "num_examples": 10, "partition_id": pid}
            if kind == "malformed":
                metrics.pop("num_examples")
            if kind in BAD_NUMBERS:  # values a hostile client can put in a MetricRecord
                field, value = BAD_NUMBERS[kind]
                metrics[field] = value
            out.append(Message(RecordDict({"arrays": _to_record(delta), "metrics": MetricRecord(metrics)}),
                               reply_to=m))
        return out


def test_fewer_replies_errors_and_malformed_messages_become_typed_failures(tiny_cfg):
    cfg = tiny_cfg(**{"run.num_clients": 4, "run.clients_per_round": 4, "run.client_timeout_s": 7})
    grid = FakeGrid({0: "ok", 1: "error", 2: "silent", 3: "malformed"})
    transport = FlowerTransport(grid, cfg, discovery_timeout_s=5)
    assert transport.pid_to_node == {0: 100, 1: 101, 2: 102, 3: 103}
    strategy = build_strategy(cfg)
    raw = transport.exchange(1, strategy.configure(1, [0, 1, 2, 3]), cfg.run.client_timeout_s)
    assert grid.timeouts[-1] == 7
    ok, failed = collect(strategy, [0, 1, 2, 3], raw, 1 << 20)
    assert [u.partition_id for u in ok] == [0]
    assert {f.partition_id: f.kind for f in failed} == {1: "error", 2: "timeout", 3: "invalid"}
    assert "ZeroDivisionError" in next(f.reason for f in failed if f.partition_id == 1)
    assert "num_examples" in next(f.reason for f in failed if f.partition_id == 3)


def test_two_nodes_claiming_one_partition_abort_the_run(tiny_cfg):
    cfg = tiny_cfg(**{"run.num_clients": 2, "run.clients_per_round": 2})
    with pytest.raises(FlowerRunError, match="partition-id 0"):
        FlowerTransport(FakeGrid({0: "ok"}, claims={100: 0, 101: 0}), cfg, discovery_timeout_s=5)


def test_no_node_at_all_is_a_bounded_clear_error(tiny_cfg):
    cfg = tiny_cfg(**{"run.num_clients": 2, "run.clients_per_round": 2})
    with pytest.raises(FlowerRunError, match="no client node answered within 1s"):
        FlowerTransport(FakeGrid({}, claims={}), cfg, discovery_timeout_s=1)


def test_a_missing_partition_node_counts_as_missing_not_a_crash(tiny_cfg):
    cfg = tiny_cfg(**{"run.num_clients": 3, "run.clients_per_round": 3})
    transport = FlowerTransport(FakeGrid({0: "ok", 1: "ok"}), cfg, discovery_timeout_s=1)
    strategy = build_strategy(cfg)
    raw = transport.exchange(1, strategy.configure(1, [0, 1, 2]), 5)
    ok, failed = collect(strategy, [0, 1, 2], raw, 1 << 20)
    assert [u.partition_id for u in ok] == [0, 1]
    assert [(f.partition_id, f.kind) for f in failed] == [(2, "missing")]


def test_hostile_numbers_in_a_reply_cost_only_that_reply(tiny_cfg):
    """inf/NaN/5.9 as num_examples or partition_id: typed failures (once an OverflowError that ended
    the ServerApp, or 5.9 silently truncated to 5), and the other clients' replies still count."""
    kinds = ["ok", *BAD_NUMBERS]
    cfg = tiny_cfg(**{"run.num_clients": len(kinds), "run.clients_per_round": len(kinds)})
    grid = FakeGrid(dict(enumerate(kinds)))
    transport = FlowerTransport(grid, cfg, discovery_timeout_s=5)
    strategy = build_strategy(cfg)
    pids = list(range(len(kinds)))
    raw = transport.exchange(1, strategy.configure(1, pids), cfg.run.client_timeout_s)
    ok, failed = collect(strategy, pids, raw, 1 << 20)
    assert [u.partition_id for u in ok] == [0]
    assert {f.partition_id: f.kind for f in failed} == {p: "invalid" for p in pids[1:]}
    codes = {kinds[f.partition_id]: f.code for f in failed}
    assert codes["frac_examples"] == codes["inf_examples"] == codes["nan_examples"] == "num_examples"
