"""Faults at the round-loop level, with a stub transport (no training, so these run in seconds).

Every test compares the server state with a reference computed by hand on the ok subset only: a
fault may cost a round its replies, never corrupt the generator.
"""

import time

import numpy as np
import pytest
import torch

from fedpers.payload import Reply
from fedpers.rounds.faults import MALFORMED, FaultyTransport
from fedpers.rounds.server import build_strategy, run_server, sample_clients
from strategies import ClientUpdate

METRICS = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.5, "num_test": 4.0}


def fake_delta(pid: int, server_round: int, prompts: np.ndarray) -> np.ndarray:
    """A deterministic 'client': pull the prompts toward a per-client target."""
    target = np.random.default_rng([pid, 7]).standard_normal(prompts.shape).astype(np.float32)
    return (0.1 * (target - prompts) + 0.01 * server_round).astype(np.float32)


class StubTransport:
    def exchange(self, server_round, payloads, timeout):
        return {pid: Reply(pid, {"delta/prompts": fake_delta(pid, server_round, p["prompts"])}, 10 + pid,
                           dict(METRICS, test_accuracy=0.1 * pid))
                for pid, p in payloads.items()}


def reference_state(cfg, ok_per_round: dict[int, list[int]]):
    """The generator after applying, round by round, only the replies of the listed clients."""
    s = build_strategy(cfg)
    for rnd in range(1, cfg.run.rounds + 1):
        sampled = sample_clients(cfg.run.seed, rnd, cfg.run.num_clients, cfg.run.clients_per_round)
        payloads = s.configure(rnd, sampled)
        ok = ok_per_round[rnd]
        if len(ok) >= cfg.run.min_replies:
            s.aggregate(rnd, [ClientUpdate(p, {"prompts": fake_delta(p, rnd, payloads[p]["prompts"])}, 10 + p,
                                           {}) for p in ok])
    return s.state_dict()


def assert_same_state(a, b):
    assert a["generator"].keys() == b["generator"].keys()
    for k in a["generator"]:
        torch.testing.assert_close(a["generator"][k], b["generator"][k], rtol=0, atol=0, msg=k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa and sa.keys() == sb.keys(), (sa.keys(), sb.keys())  # an optimizer that never stepped has no state
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for key in sa[i]:
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=0, atol=0, msg=f"{i}/{key}")


@pytest.fixture
def cfg5(tiny_cfg):
    return lambda **kw: tiny_cfg(**{"run.num_clients": 5, "run.clients_per_round": 5, "run.min_replies": 2,
                                    "run.client_timeout_s": 0.5, **kw})


def test_raise_hang_silent_round_completes_with_the_rest(cfg5):
    cfg = cfg5()
    strategy = build_strategy(cfg)
    transport = FaultyTransport(StubTransport(), {(1, None): "raise", (2, None): "hang", (3, None): "silent"},
                                hang_s=5.0)
    t0 = time.perf_counter()
    summary = run_server(cfg, transport, strategy)
    elapsed = time.perf_counter() - t0
    rows = summary_rows(cfg)
    for row in rows:
        assert row["num_ok"] + row["num_failed"] + row["num_timed_out"] == len(row["sampled"]) == 5
        assert (row["num_ok"], row["num_failed"], row["num_timed_out"]) == (2, 1, 2)
        assert row["applied"]
        assert {f["partition_id"]: f["kind"] for f in row["failures"]} == {1: "error", 2: "timeout", 3: "missing"}
    # The hanging client cost each round about run.client_timeout_s, not its 5 s hang.
    assert elapsed < 2 * 5.0
    assert summary["failures"] == 6 and summary["timed_out"] == 4 and summary["skipped_rounds"] == []
    assert_same_state(strategy.state_dict(), reference_state(cfg, {1: [0, 4], 2: [0, 4]}))


def test_round_below_min_replies_is_skipped_not_applied(cfg5):
    cfg = cfg5(**{"run.min_replies": 3})
    strategy = build_strategy(cfg)
    # Round 1: only clients 0 and 1 answer (< 3) -> skipped; round 2: everyone answers.
    faults = {(p, 1): "raise" for p in (2, 3, 4)}
    summary = run_server(cfg, FaultyTransport(StubTransport(), faults), strategy)
    rows = summary_rows(cfg)
    assert [r["applied"] for r in rows] == [False, True]
    assert summary["skipped_rounds"] == [1]
    assert_same_state(strategy.state_dict(), reference_state(cfg, {1: [], 2: [0, 1, 2, 3, 4]}))


EXPECTED_CODE = {
    "nan": "nonfinite", "inf": "nonfinite", "shape": "shape", "dtype": "dtype", "missing_key": "keys",
    "extra_key": "keys", "negative_examples": "num_examples", "absurd_examples": "num_examples",
    "oversize": "size", "wrong_partition": "partition",
}


def test_every_malformed_fault_has_an_expected_code():
    assert set(EXPECTED_CODE) == set(MALFORMED)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_reply_rejected_with_typed_reason_state_untouched(cfg5, kind):
    cfg = cfg5(**{"run.rounds": 1, "run.max_upload_mb": 1.0})
    strategy = build_strategy(cfg)
    run_server(cfg, FaultyTransport(StubTransport(), {(0, None): kind, (3, None): kind}), strategy)
    (row,) = summary_rows(cfg)
    assert (row["num_ok"], row["num_failed"], row["num_timed_out"]) == (3, 2, 0)
    for f in row["failures"]:
        assert f["kind"] == "invalid" and f["code"] == EXPECTED_CODE[kind], f
        assert f["reason"]
    assert_same_state(strategy.state_dict(), reference_state(cfg, {1: [1, 2, 4]}))


def summary_rows(cfg):
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
