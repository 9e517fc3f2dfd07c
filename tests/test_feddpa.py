"""FedDPA: the global adapter is averaged, the local one never leaves the client, and each test instance
is scored with its own weight a(x) = max_weight * mean cosine similarity to the reference instances."""

import numpy as np
import pytest
import torch

from fedpers.experiment import load_config
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import build_strategy, run_server
from strategies.feddpa import LOCAL, instance_weight, local_only, mixed
from tests.conftest import text_tiny_overrides


def test_instance_weight_is_scaled_mean_cosine():
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # row 0: cos = 1, 0, 1/sqrt2 ; row 1: cos = 0, 1, 1/sqrt2
    expected = 0.5 * (1 + 0 + 2 ** -0.5) / 3
    torch.testing.assert_close(instance_weight(emb, ref, 0.5), torch.tensor([expected, expected]))


class Spy(InProcessTransport):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.sent, self.received = [], []

    def exchange(self, server_round, payloads, timeout):
        self.sent.append({p: {k: v.copy() for k, v in a.items()} for p, a in payloads.items()})
        out = super().exchange(server_round, payloads, timeout)
        self.received.append(out)
        return out


@pytest.fixture(scope="module")
def feddpa_run(tmp_path_factory):
    cfg = load_config(None, text_tiny_overrides(tmp_path_factory.mktemp("feddpa"), **{"strategy.name": "feddpa",
                                                                                     "run.rounds": 1}))
    t = Spy(cfg)
    strategy = build_strategy(cfg)
    start = strategy.state_dict()["shared"]
    summary = run_server(cfg, t, strategy)
    return cfg, t, strategy, start, summary


def test_global_adapter_is_averaged_and_local_one_never_travels(feddpa_run):
    _cfg, t, strategy, start, _ = feddpa_run
    for msgs in t.sent:
        assert not any(k.startswith(LOCAL) for a in msgs.values() for k in a)
    replies = sorted(t.received[0].values(), key=lambda r: r.partition_id)
    assert not any(k.removeprefix("delta/").startswith(LOCAL) for r in replies for k in r.arrays)
    n = np.array([r.num_examples for r in replies], dtype=np.float64)
    for k, v in strategy.state_dict()["shared"].items():
        mean = sum(w * r.arrays["delta/" + k] for w, r in zip(n / n.sum(), replies))
        np.testing.assert_allclose(v, start[k] + mean, rtol=1e-5, atol=1e-6)
    # every client trained its own local adapter (B left zero would mean it never learned)
    states = [t.states[p] for p in sorted(t.states)]
    b = next(k for k in states[0] if k.startswith(LOCAL) and k.endswith("lora_B.weight"))
    assert all(np.abs(s[b]).max() > 0 for s in states)
    assert not np.array_equal(states[0][b], states[1][b])


def test_mixture_limits_are_the_single_adapters():
    """a = 0 in the mixture is the global adapter alone; a = 1 is the local adapter alone."""
    from fedpers.models.text import load_text_model

    model = load_text_model("all-MiniLM-L6-v2", "lora", 4, 16, 8, 16.0, ("query", "value"))
    shapes = model.tensor_shapes()
    g = torch.Generator().manual_seed(0)
    tensors = {"head.weight": torch.zeros(2, 384), "head.bias": torch.zeros(2)}
    for k, s in shapes.items():
        tensors[k] = torch.randn(*s, generator=g) * 0.05
        tensors[LOCAL + k] = torch.randn(*s, generator=g) * 0.05
    batch = model.prepare(["one text", "and another"])
    glob = {k: tensors[k] for k in list(shapes) + ["head.weight", "head.bias"]}
    with torch.no_grad():
        f = {name: model.features_with(batch, t) for name, t in (
            ("mix0", mixed(shapes, tensors, 0.0, 2.0, train_local=True)),
            ("mix1", mixed(shapes, tensors, 1.0, 2.0, train_local=False)),
            ("glob", glob), ("loc", local_only(shapes, tensors)))}
    torch.testing.assert_close(f["mix0"], f["glob"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f["mix1"], f["loc"], rtol=1e-4, atol=1e-5)
    assert (f["glob"] - f["loc"]).abs().max() > 1e-3
