"""The torch thread policy (fedpers.rounds.threads): who decides, the auto rule, and the busy-core arithmetic."""

import pytest
import torch

from fedpers.rounds import threads
from fedpers.config import ConfigError
from fedpers.experiment import load_config


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cores,others,jobs,expected", [
    (2, 0.0, 1, 2),    # idle machine: one thread per core
    (2, 1.0, 1, 1),    # one neighbour on one core: leave it that core
    (2, 0.3, 1, 1),    # a core 70% idle is not free: a barrier would still wait on it
    (2, 0.2, 1, 2),    # 80% idle is
    (2, 2.5, 1, 1),    # overloaded: never below one thread
    (8, 0.0, 2, 4),    # two fedpers jobs split the free cores
    (8, 3.0, 2, 2),
    (2, None, 1, 2),   # no /proc/stat: every core counts as free
])
def test_auto_rule_leaves_busy_cores_to_their_owners(cores, others, jobs, expected):
    assert threads.choose(cores, others, jobs) == expected


def test_run_threads_beats_omp_num_threads_which_beats_auto(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.explicit_threads(2) == 2
    assert threads.explicit_threads(0) == 3
    assert threads.torch_threads(jobs=4, requested=0, sample_s=0) == 3  # the user's pin is not divided
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.explicit_threads(0) is None


def test_busy_meter_counts_other_processes_not_this_one(monkeypatch):
    # Readings of (busy CPU s, total CPU s over all cores, own CPU s) on a 2-core kernel over 1 s of wall time.
    readings = iter([(10.0, 100.0, 5.0), (11.8, 102.0, 5.9)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(threads, "_proc_stat_cores", lambda: 2)
    meter = threads.BusyMeter()
    # 1.8 CPU s busy in 1 s, 0.9 of it ours: others kept 0.9 of a core busy.
    assert meter.others_busy() == pytest.approx(0.9)


def test_policy_follows_the_load_between_rounds_when_auto(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_count", lambda: 2)
    load = iter([0.0, 0.0, 1.0, 0.0])
    monkeypatch.setattr(threads.BusyMeter, "others_busy", lambda self: next(load))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    pol = threads.ThreadPolicy(0)
    assert pol.threads == torch.get_num_threads() == 2
    assert pol.update() == 2
    assert pol.update() == torch.get_num_threads() == 1  # a neighbour started
    assert pol.update() == torch.get_num_threads() == 2  # and stopped
    fixed = threads.ThreadPolicy(1)
    assert fixed.update() == torch.get_num_threads() == 1  # an explicit count never moves


def test_fast_engine_applies_run_threads(tmp_path):
    from fedpers.rounds.engine import InProcessTransport
    from tests.conftest import tiny_overrides

    for n in (1, 2):
        cfg = load_config(None, tiny_overrides(tmp_path, **{"run.engine": "fast", "run.threads": n}))
        InProcessTransport(cfg).close()
        assert torch.get_num_threads() == n


def test_negative_threads_is_a_config_error():
    with pytest.raises(ConfigError, match="run.threads"):
        load_config(None, ["run.threads=-1"])
