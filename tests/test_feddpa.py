"""FedDPA: the global adapter is averaged, the local one never leaves the client; from round 2 on a client
trains the local adapter against the frozen received global one and then the global adapter alone; each
test instance is scored with its own weight a(x) = max_weight * mean cosine similarity to the reference
instances, on the global adapter (1 - a(x) on the local one), as the official code does."""

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
    # two rounds: the first has no local phase (official main.py 208), the second trains both adapters
    cfg = load_config(None, text_tiny_overrides(tmp_path_factory.mktemp("feddpa"), **{"strategy.name": "feddpa",
                                                                                     "run.rounds": 2}))
    t = Spy(cfg)
    strategy = build_strategy(cfg)
    start = strategy.state_dict()["shared"]
    summary = run_server(cfg, t, strategy)
    return cfg, t, strategy, start, summary


def test_global_adapter_is_averaged_and_local_one_never_travels(feddpa_run):
    _cfg, t, strategy, start, _ = feddpa_run
    for msgs in t.sent:
        assert not any(k.startswith(LOCAL) for a in msgs.values() for k in a)
    replies = [sorted(received.values(), key=lambda r: r.partition_id) for received in t.received]
    assert not any(k.removeprefix("delta/").startswith(LOCAL) for rs in replies for r in rs for k in r.arrays)
    shared = dict(start)
    for rs in replies:  # FedAvg of the global adapter, round after round
        n = np.array([r.num_examples for r in rs], dtype=np.float64)
        shared = {k: v + sum(w * r.arrays["delta/" + k] for w, r in zip(n / n.sum(), rs)) for k, v in shared.items()}
    for k, v in strategy.state_dict()["shared"].items():
        np.testing.assert_allclose(v, shared[k], rtol=1e-5, atol=1e-6)
    # every client trained its own local adapter in round 2 (B left zero would mean it never learned)
    states = [t.states[p] for p in sorted(t.states)]
    b = next(k for k in states[0] if k.startswith(LOCAL) and k.endswith("lora_B.weight"))
    assert all(np.abs(s[b]).max() > 0 for s in states)
    assert not np.array_equal(states[0][b], states[1][b])


def test_mixture_limits_are_the_single_adapters():
    """Weights (1, 0) in the mixture are the global adapter alone, (0, 1) the local adapter alone, whichever
    of the two is the trainable LoRA and which the frozen fold."""
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
            ("mix0", mixed(shapes, tensors, 1.0, 0.0, 2.0, train="local")),
            ("mix1", mixed(shapes, tensors, 0.0, 1.0, 2.0, train="global")),
            ("glob", glob), ("loc", local_only(shapes, tensors)))}
    torch.testing.assert_close(f["mix0"], f["glob"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f["mix1"], f["loc"], rtol=1e-4, atol=1e-5)
    assert (f["glob"] - f["loc"]).abs().max() > 1e-3


# --- the per-instance evaluation path and the round order (issue 23) -------------------------------------

def _random_adapters(shapes, seed=0, scale=0.1):
    """Global and local LoRA factors (B non-zero, so both adapters move the features) and a random head."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, s in shapes.items():
        if k.startswith("head."):
            tensors[k] = torch.randn(*s, generator=g)
        else:
            tensors[k] = torch.randn(*s, generator=g) * scale
            tensors[LOCAL + k] = torch.randn(*s, generator=g) * scale
    return tensors


def _hand_mixture(shapes, tensors, w_global, w_local, s):
    """h = W0 + s [w_global B_g A_g + w_local B_l A_l], built as one dense fold per module (LoRA B = 0),
    independently of strategies.feddpa.mixed."""
    from strategies.lora_fold import a_of, b_of, fold_of, modules

    out = {k: tensors[k] for k in ("head.weight", "head.bias")}
    for m in modules(shapes):
        out[a_of(m)] = tensors[a_of(m)]
        out[b_of(m)] = torch.zeros_like(tensors[b_of(m)])
        out[fold_of(m)] = s * (w_global * tensors[b_of(m)] @ tensors[a_of(m)]
                               + w_local * tensors[LOCAL + b_of(m)] @ tensors[LOCAL + a_of(m)])
    return out


def test_evaluate_weighs_the_global_adapter_by_a_of_x_per_instance(tmp_path):
    """evaluate_model scores instance x with h = W0 + s[a(x) B_g A_g + (1 - a(x)) B_l A_l] (the official
    inference: GlobalModel_generated.py 156, 344 and 383 with lora/layer.py 229-231), a(x) = max_weight x mean
    cosine of x's features under the local adapter alone to the references. Two test instances get
    different a(x) (one is the reference itself, a = max_weight = 1); the test checks that a constant a, or
    a(x) on the local adapter, would give a different loss, so it fails on either mistake."""
    import dataclasses
    from types import SimpleNamespace

    import torch.nn.functional as F

    from fedpers.client import make_context
    from strategies.feddpa import REF, FedDPA
    from strategies.lora_fold import factor_names, lora_scaling

    cfg = load_config(None, text_tiny_overrides(tmp_path, **{"strategy.name": "feddpa", "strategy.max_weight": 1.0}))
    ctx = make_context(cfg, 0, 2)
    texts = ["the match ended in a late penalty", "interest rates rose again this quarter"]
    y = torch.tensor([0, 1])
    ctx = dataclasses.replace(ctx, data=SimpleNamespace(x_test=texts, y_test=y))
    shapes, model, s = ctx.shapes, ctx.model, lora_scaling(cfg)
    tensors = _random_adapters(shapes)
    x = model.embed(model.prepare(texts))
    local_alone = {**{k: tensors[LOCAL + k] for k in factor_names(shapes)}, "head.weight": tensors["head.weight"],
                   "head.bias": tensors["head.bias"]}
    with torch.no_grad():
        emb = model.features_with(x, local_alone)
    tensors[REF] = emb[:1].clone()  # one reference: the first test instance itself
    a = (1.0 * F.cosine_similarity(emb, tensors[REF], dim=-1)).tolist()
    assert a[0] == pytest.approx(1.0, abs=1e-5) and a[0] - a[1] > 0.05, a  # the two instances get different a(x)

    def loss_of(weights):  # weights[i] = (w_global, w_local) for instance i
        with torch.no_grad():
            logits = torch.cat([F.linear(model.features_with(x[i:i + 1], t := _hand_mixture(shapes, tensors, *w, s)),
                                         t["head.weight"], t["head.bias"]) for i, w in enumerate(weights)])
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    expected = loss_of([(ai, 1 - ai) for ai in a])
    on_local = loss_of([(1 - ai, ai) for ai in a])
    constant = loss_of([(float(np.mean(a)), 1 - float(np.mean(a)))] * 2)
    assert abs(on_local[0] - expected[0]) > 1e-2 and abs(constant[0] - expected[0]) > 1e-2, (expected, on_local, constant)
    loss, acc = FedDPA.evaluate_model(ctx, tensors)
    assert loss == pytest.approx(expected[0], rel=1e-4, abs=1e-5)
    assert acc == expected[1]


def test_round_order_local_first_against_frozen_global_then_global_alone(tmp_path, monkeypatch):
    """Official FedDPA-T (main.py 208-245, client.py 89-110): from the second round on, a client first trains
    its local adapter inside h = W0 + s[a B_l A_l + (1 - a) B_g A_g] with the received global adapter frozen
    (a = strategy.train_weight), then trains the global adapter alone (h = W0 + s B_g A_g), which is what it
    sends back. In the first round there is no local phase: the global adapter takes the whole budget."""
    from fedpers import client
    from fedpers.client import local_budget, make_context
    from strategies.lora_fold import FOLD, a_of, b_of, factor_names, fold_of, lora_scaling, modules

    cfg = load_config(None, text_tiny_overrides(tmp_path, **{"strategy.name": "feddpa", "strategy.train_weight": 0.3,
                                                            "run.rounds": 2, "client.local_epochs": 2}))
    calls = []
    real_fit = client.fit

    def recording_fit(ctx, tensors, trainable, epochs, extra_loss=None, salt=0, view=None, steps=None):
        before = {k: v.detach().clone() for k, v in tensors.items()}
        used = {k: v.detach().clone() for k, v in view(tensors).items()} if view is not None else None
        losses = real_fit(ctx, tensors, trainable, epochs, extra_loss=extra_loss, salt=salt, view=view, steps=steps)
        calls.append({"round": ctx.server_round, "pid": ctx.partition_id, "trainable": set(trainable),
                      "steps": steps, "before": before, "used": used,
                      "after": {k: v.detach().clone() for k, v in tensors.items()}})
        return losses

    monkeypatch.setattr(client, "fit", recording_fit)
    run_server(cfg, InProcessTransport(cfg), build_strategy(cfg))

    shapes = make_context(cfg, 0, 1).shapes
    glob = set(factor_names(shapes))
    loc = {LOCAL + k for k in glob}
    head = {"head.weight", "head.bias"}
    s, a = lora_scaling(cfg), 0.3
    for pid in range(cfg.run.num_clients):
        budget = local_budget(make_context(cfg, pid, 1))
        mine = {r: [c for c in calls if c["pid"] == pid and c["round"] == r] for r in (1, 2)}
        # round 1: the global adapter alone, on the whole budget
        (only,) = mine[1]
        assert only["trainable"] == glob | head and only["steps"] == budget
        assert not any(k.endswith(FOLD) for k in only["used"])
        assert all(torch.equal(only["used"][k], only["before"][k]) for k in glob)
        # round 2: the local adapter first, against the frozen received global adapter ...
        first, second = mine[2]
        assert first["trainable"] == loc | head and second["trainable"] == glob | head
        assert first["steps"] + second["steps"] == budget
        assert all(torch.equal(first["before"][k], first["after"][k]) for k in glob)  # global frozen
        for m in modules(shapes):
            u, t = first["used"], first["before"]
            torch.testing.assert_close(u[a_of(m)], t[LOCAL + a_of(m)])
            torch.testing.assert_close(u[b_of(m)], a * t[LOCAL + b_of(m)])
            torch.testing.assert_close(u[fold_of(m)], (1 - a) * s * (t[b_of(m)] @ t[a_of(m)]))
        assert any(not torch.equal(first["before"][k], first["after"][k]) for k in loc)  # the local one learned
        # ... then the global adapter alone, from the received global adapter (untouched by the local phase)
        assert not any(k.endswith(FOLD) for k in second["used"])
        assert all(torch.equal(second["used"][k], second["before"][k]) for k in glob)
        assert all(torch.equal(second["before"][k], first["before"][k]) for k in glob)
