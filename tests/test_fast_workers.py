"""run.workers: the fast engine trains a round's clients in worker processes, with the same results."""

import json
import os
import signal

import numpy as np
import pytest

from fedpers import simulate
from fedpers.config import ConfigError
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import build_strategy
from tests.conftest import tiny_overrides

PIDS = [0, 1, 2, 3]


def rounds_of(cfg, transport, rounds, between=None):
    strategy = build_strategy(cfg)
    out = []
    for rnd in range(1, rounds + 1):
        if between and rnd > 1:
            between(transport)
        out.append(transport.exchange(rnd, strategy.configure(rnd, PIDS), 60.0))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from fedpers.experiment import load_config

    cfg = load_config(None, tiny_overrides(tmp_path_factory.mktemp("ref"), **{"run.num_clients": 6,
                                                                              "run.engine": "fast"}))
    t = InProcessTransport(cfg)
    return cfg, rounds_of(cfg, t, 2), t.states


def assert_close(a, b):
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for pid in ra:
            assert not hasattr(ra[pid], "kind") and not hasattr(rb[pid], "kind"), (ra[pid], rb[pid])
            assert ra[pid].arrays.keys() == rb[pid].arrays.keys()
            for k in ra[pid].arrays:  # workers run with their share of the threads: float-level differences
                np.testing.assert_allclose(ra[pid].arrays[k], rb[pid].arrays[k], rtol=0, atol=1e-5)
            assert ra[pid].metrics["test_accuracy"] == pytest.approx(rb[pid].metrics["test_accuracy"], abs=1e-6)


def test_workers_give_the_results_of_one_process(reference):
    """Client state stays with the transport and travels with every call, so workers change nothing."""
    cfg, ref, ref_states = reference
    cfg.run.workers = 2
    t = InProcessTransport(cfg)
    try:
        got = rounds_of(cfg, t, 2)
    finally:
        t.close()
    assert_close(got, ref)
    assert t.states.keys() == ref_states.keys()
    for pid in ref_states:
        for k in ref_states[pid]:
            np.testing.assert_allclose(t.states[pid][k], ref_states[pid][k], rtol=0, atol=1e-5)


def test_a_killed_worker_is_replaced_and_the_run_goes_on(reference):
    cfg, ref, _ = reference
    cfg.run.workers = 2
    t = InProcessTransport(cfg)
    killed = []

    def kill_one(transport):
        pid = next(iter(transport._pool._processes))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    try:
        got = rounds_of(cfg, t, 2, between=kill_one)
    finally:
        t.close()
    assert killed
    assert_close(got, ref)


def test_simulate_with_workers_writes_the_same_results(tmp_path):
    runs = {}
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        assert simulate.main(tiny_overrides(out, **{"run.engine": "fast", "run.workers": w})) == 0
        runs[w] = json.loads((out / "summary.json").read_text())
    a, b = runs[1]["final"]["per_client"], runs[2]["final"]["per_client"]
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
    assert runs[2]["failures"] == 0


@pytest.mark.parametrize("overrides", [
    {"run.workers": 0},
    {"run.workers": 2, "run.engine": "flower"},
    {"run.workers": 2, "run.engine": "fast", "run.batch_clients": "true"},
])
def test_bad_workers_config_names_the_field(tiny_cfg, overrides):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(**overrides)
    assert e.value.field == "run.workers"


def test_a_client_that_raises_in_a_worker_fails_alone(reference):
    cfg, _, _ = reference
    cfg.run.workers = 2
    strategy = build_strategy(cfg)
    payloads = strategy.configure(1, PIDS)
    payloads[1] = {k: np.zeros((3,) + v.shape, v.dtype) for k, v in payloads[1].items()}  # wrong shapes
    t = InProcessTransport(cfg)
    try:
        raw = t.exchange(1, payloads, 60.0)
    finally:
        t.close()
    assert raw[1].kind == "error" and "worker process died" not in raw[1].reason
    assert all(not hasattr(raw[p], "kind") for p in (0, 2, 3))
    assert 1 not in t.states and set(t.states) == {0, 2, 3}
