"""Every registered strategy passes the same contract; a newly registered one is covered with no edits."""

import numpy as np
import pytest

from fedpers.engine import InProcessTransport
from fedpers.server import build_strategy, run_server
from strategies import get_strategy_class, list_strategies


def _cases() -> list[tuple[str, str]]:
    """(strategy, adapter): vision prompts for vision-capable strategies, text LoRA for LoRA ones, and
    the prompt strategies once more on text soft prompts (pfedpg must work unchanged there)."""
    cases = []
    for name in list_strategies():
        cls = get_strategy_class(name)
        if "vision" in cls.modalities:
            cases.append((name, "vision"))
        if "text" in cls.modalities and "lora" in cls.adapters:
            cases.append((name, "lora"))
    cases += [("pfedpg", "prompt"), ("fedvpt", "prefix")]
    return cases


class SpyTransport(InProcessTransport):
    """The in-process engine, recording every message in both directions."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sent, self.received = [], []

    def exchange(self, server_round, payloads, timeout):
        self.sent.append({pid: {k: v.copy() for k, v in a.items()} for pid, a in payloads.items()})
        out = super().exchange(server_round, payloads, timeout)
        self.received.append(out)
        return out


def run(cfg):
    t = SpyTransport(cfg)
    strategy = build_strategy(cfg)
    summary = run_server(cfg, t, strategy)
    return summary, t, strategy


@pytest.fixture(scope="module", params=_cases(), ids=lambda c: "-".join(c))
def two_rounds(request, tmp_path_factory):
    from fedpers.config import load_config
    from tests.conftest import text_tiny_overrides, tiny_overrides

    name, adapter = request.param
    out = tmp_path_factory.mktemp(f"{name}-{adapter}")
    if adapter == "vision":
        overrides = tiny_overrides(out, **{"strategy.name": name})
    else:
        overrides = text_tiny_overrides(out, adapter, **{"strategy.name": name})
    cfg = load_config(None, overrides)
    return cfg, run(cfg)


def test_sends_and_receives_only_declared_tensors(two_rounds):
    cfg, (summary, t, strategy) = two_rounds
    assert summary["rounds"] == 2 and summary["failures"] == 0
    for sent, received in zip(t.sent, t.received):
        for pid, arrays in sent.items():
            assert set(arrays) == set(strategy.sends)
            for k, a in arrays.items():
                assert a.dtype == np.float32 and a.shape == tuple(strategy.client_shapes(pid)[k])
        for reply in received.values():
            assert set(reply.arrays) == {f"delta/{k}" for k in strategy.sends}
            # personal tensors (heads, for most strategies) never travel
            assert not {k.removeprefix("delta/") for k in reply.arrays} & set(strategy.personal)
    for state in t.states.values():
        assert set(state) == set(strategy.personal)


def test_metrics_are_finite(two_rounds):
    _, (summary, t, _) = two_rounds
    for received in t.received:
        for reply in received.values():
            assert all(np.isfinite(v) for v in reply.metrics.values())
            assert all(np.isfinite(a).all() for a in reply.arrays.values())
    assert 0 <= summary["final"]["accuracy_mean"] <= 1


def test_deterministic_for_a_seed(two_rounds, tmp_path):
    import dataclasses

    cfg, (summary, t, strategy) = two_rounds
    again = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(tmp_path)))
    summary2, t2, strategy2 = run(again)
    assert summary2["final"]["per_client"] == summary["final"]["per_client"]
    for a, b in zip(t.sent, t2.sent):
        for pid in a:
            for k in a[pid]:
                np.testing.assert_array_equal(a[pid][k], b[pid][k])


def test_server_state_survives_save_and_load(two_rounds):
    import io

    import torch

    cfg, (_, _, strategy) = two_rounds
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    buf.seek(0)
    fresh = build_strategy(cfg)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    pids = list(range(cfg.run.num_clients))
    a, b = strategy.configure(3, pids), fresh.configure(3, pids)
    for pid in pids:
        assert set(a[pid]) == set(b[pid])
        for k in a[pid]:
            np.testing.assert_array_equal(a[pid][k], b[pid][k])
