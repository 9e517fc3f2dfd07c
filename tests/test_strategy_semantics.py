"""Targeted checks where a strategy's semantics matter: exact limits between methods, the FedAvg mean,
the models behind deep prompts and full-model FedAvg. Each strategy's defining mechanism is pinned in
tests/test_strategy_mechanisms.py and tests/test_generator_updates.py."""

import numpy as np
import pytest
import torch

from fedpers.config import ConfigError

from fedpers.experiment import load_config
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import build_strategy, run_server
from strategies import ClientUpdate, create_strategy, get_config_cls
from tests.conftest import tiny_overrides


def run(tmp_path, name, rounds=2, **strategy):
    cfg = load_config(None, tiny_overrides(tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}", **{
        "strategy.name": name, "run.rounds": rounds, **{f"strategy.{k}": v for k, v in strategy.items()}}))
    s = build_strategy(cfg)
    summary = run_server(cfg, InProcessTransport(cfg), s)
    return summary["final"]["per_client"], s


def assert_same_state(a, b):
    for k, v in a.state_dict()["global"].items():
        np.testing.assert_array_equal(v, b.state_dict()["global"][k], err_msg=k)


def test_fedprox_with_mu_zero_is_fedavg_and_mu_changes_it(tmp_path):
    acc_avg, avg = run(tmp_path, "fedavg")
    acc_prox, prox = run(tmp_path, "fedprox", mu=0.0)
    assert acc_prox == acc_avg
    assert_same_state(avg, prox)
    _, strong = run(tmp_path, "fedprox", rounds=1, mu=5.0)
    _, avg1 = run(tmp_path, "fedavg", rounds=1)
    # a strong proximal pull keeps the clients, hence the new global prompts, closer to the start
    start = build_strategy(load_config(None, tiny_overrides(tmp_path / "x", **{"strategy.name": "fedavg"})))
    moved = {n: np.linalg.norm(s.global_tensors["prompts"] - start.global_tensors["prompts"])
             for n, s in (("prox", strong), ("avg", avg1))}
    assert moved["prox"] < moved["avg"]


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_fedavg_aggregate_is_the_weighted_mean_of_client_models(weighting):
    shapes = {"prompts": (3, 4), "head.weight": (2, 4), "head.bias": (2,)}
    s = create_strategy(get_config_cls("fedavg")(weighting=weighting), num_clients=3, shapes=shapes, seed=0)
    start = {k: v.copy() for k, v in s.global_tensors.items()}
    rng = np.random.default_rng(0)
    sizes = [5, 15, 30]
    trained = [{k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()} for _ in sizes]
    s.aggregate(1, [ClientUpdate(i, {k: t[k] - start[k] for k in shapes}, n, {})
                    for i, (t, n) in enumerate(zip(trained, sizes))])
    w = np.array(sizes, float) / sum(sizes) if weighting == "num_examples" else np.ones(3) / 3
    for k in shapes:
        np.testing.assert_allclose(s.global_tensors[k], sum(wi * t[k] for wi, t in zip(w, trained)), atol=1e-5)


def test_deep_prompts_reach_every_block_and_shallow_path_is_unchanged():
    from fedpers.models.prompted import load_backbone

    m = load_backbone("vit_fedpers_digits", True, None)
    x = m.prepare(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    deep = torch.randn(m.depth, 3, m.embed_dim, requires_grad=True)
    m.features(m.embed(x), deep).sum().backward()
    assert all(float(g.abs().sum()) > 0 for g in deep.grad)  # every block's prompts matter
    # the deep path with layer-0 prompts only is not the shallow path: later layers are replaced
    shallow = m.features(m.embed(x), deep[0].detach())
    ref = m.forward(x, deep[0].detach(), prepared=True)
    torch.testing.assert_close(shallow, ref)
    assert not torch.allclose(shallow, m.features(m.embed(x), deep.detach()))


def test_fedavg_full_trains_the_backbone_and_refuses_large_ones(tmp_path):
    _, s = run(tmp_path, "fedavg_full", rounds=1)
    start = build_strategy(load_config(None, tiny_overrides(tmp_path / "y", **{"strategy.name": "fedavg_full"})))
    names = [k for k in s.sends if k.startswith("backbone.")]
    assert len(names) > 50
    assert sum(float(np.abs(s.global_tensors[k] - start.global_tensors[k]).max()) > 0 for k in names) > 0.9 * len(names)
    cfg = load_config(None, tiny_overrides(tmp_path / "z", **{"strategy.name": "fedavg_full",
                                                            "strategy.max_backbone_params": 1000}))
    with pytest.raises(ConfigError, match="max_backbone_params"):
        build_strategy(cfg)


# -- pFedHN: the hypernetwork update is the chain rule, checked against a float64 re-derivation --

def test_pfedhn_sgd_update_equals_reference_chain_rule():
    K, D, N = 2, 6, 4
    cfg = get_config_cls("pfedhn")(server_optimizer="sgd", server_lr=0.1, embed_dim=3, hidden_dim=5, n_hidden=2)
    s = create_strategy(cfg, num_clients=N, shapes={"prompts": (K, D)}, seed=0)
    p = {k: v.detach().double().clone().requires_grad_(True) for k, v in s.generator.state_dict().items()}

    def reference(i):  # MLP written out: relu(relu(e W0^T + b0) W2^T + b2) W4^T + b4
        h = p["descriptors"][i]
        for layer in (0, 2):
            h = torch.relu(h @ p[f"mlp.{layer}.weight"].T + p[f"mlp.{layer}.bias"])
        return (h @ p["mlp.4.weight"].T + p["mlp.4.bias"]).view(K, D)

    sent = s.configure(1, [1, 3])
    for i in (1, 3):
        np.testing.assert_allclose(sent[i]["prompts"], reference(i).detach().numpy(), rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(2)
    deltas = {i: rng.standard_normal((K, D)).astype(np.float32) for i in (1, 3)}
    surrogate = sum(-0.5 * (torch.from_numpy(deltas[i]).double() * reference(i)).sum() for i in (1, 3))
    surrogate.backward()
    s.aggregate(1, [ClientUpdate(i, {"prompts": deltas[i]}, 10, {}) for i in (1, 3)])
    got = s.generator.state_dict()
    for k, v in p.items():
        np.testing.assert_allclose(got[k].double().numpy(), (v - 0.1 * v.grad).detach().numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", ["pfedpg", "pfedhn"])
def test_unseen_client_fits_only_its_descriptor_toward_its_target(name):
    K, D, N = 3, 8, 5
    s = create_strategy(get_config_cls(name)(unseen_lr=0.05), num_clients=N, shapes={"prompts": (K, D)}, seed=0)
    before = {k: v.clone() for k, v in s.generator.state_dict().items()}
    target = s.configure(0, [0])[0]["prompts"]  # reachable with the frozen generator: trained client 0's prompts
    held = [4]

    def distance():
        return float(np.linalg.norm(s.configure_unseen(0, held)[4]["prompts"] - target))

    start = distance()
    for r in range(1, 31):
        sent = s.configure_unseen(r, held)
        s.adapt_unseen(r, [ClientUpdate(4, {"prompts": 0.5 * (target - sent[4]["prompts"])}, 10, {})])
    assert distance() < 0.5 * start
    for k, v in s.generator.state_dict().items():  # the trained generator is frozen
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("value, count", [(0, 0), (0.2, 2), (0.04, 1), (3, 3)])
def test_holdout_clients_fraction_or_count(value, count):
    from fedpers.config import holdout_count

    cfg = load_config(None, [f"run.holdout_clients={value}", "run.clients_per_round=5"])
    assert holdout_count(cfg.run) == count


@pytest.mark.parametrize("overrides, field", [
    (["run.holdout_clients=-1"], "run.holdout_clients"),
    (["run.holdout_clients=2.5"], "run.holdout_clients"),
    (["run.holdout_clients=10"], "run.holdout_clients"),
    (["run.holdout_clients=2"], "run.clients_per_round"),  # 10 per round but only 8 train
    (["run.unseen_rounds=0"], "run.unseen_rounds"),
    (["strategy.name=apfl", "strategy.alpha=1.5"], "strategy.alpha"),
    (["strategy.name=apfl", "strategy.alpha_lr=-1"], "strategy.alpha_lr"),
    (["strategy.name=apfl_fixed", "strategy.alpha=-0.1"], "strategy.alpha"),
    (["strategy.name=fedrep", "strategy.head_fraction=1"], "strategy.head_fraction"),
    (["strategy.name=ditto", "strategy.personal_fraction=0"], "strategy.personal_fraction"),
    (["strategy.name=pfedhn", "strategy.server_steps=per_client"], "strategy.server_steps"),
    (["strategy.name=pfedhn", "strategy.server_momentum=0.9"], "strategy.server_momentum"),  # Adam has no momentum field
    (["strategy.name=pfedpg", "strategy.server_weight_decay=-1"], "strategy.server_weight_decay"),
    (["strategy.name=fedprox", "strategy.mu=-1"], "strategy.mu"),
    (["strategy.name=ditto", "strategy.lam=-0.1"], "strategy.lam"),
    (["strategy.name=fedavg_ft", "strategy.ft_tensors=body"], "strategy.ft_tensors"),
    (["strategy.name=pfedhn", "strategy.hidden_dim=0"], "strategy.hidden_dim"),
])
def test_bad_values_name_their_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field == field


@pytest.mark.parametrize("name", ["apfl", "apfl_fixed"])
def test_apfl_default_averages_w_uniformly_over_the_round(name):
    """APFL's reference code (FedTorch fedavg.py 24) weights every online client by 1/|U|: with 1, 10 and
    100 examples the new global tensors are the plain mean of the clients' trained ones."""
    shapes = {"prompts": (2, 3), "head.weight": (2, 3), "head.bias": (2,)}
    s = create_strategy(get_config_cls(name)(), num_clients=3, shapes=shapes, seed=0)
    assert s.config.weighting == "uniform"
    start = {k: v.copy() for k, v in s.global_tensors.items()}
    trained = [{k: np.full(v, float(c), np.float32) for k, v in shapes.items()} for c in (3.0, -6.0, 12.0)]
    s.aggregate(1, [ClientUpdate(i, {k: t[k] - start[k] for k in shapes}, n, {})
                    for i, (t, n) in enumerate(zip(trained, (1, 10, 100)))])
    for k in shapes:  # (3 - 6 + 12) / 3 = 3; weighted by examples it would be (3 - 60 + 1200) / 111
        np.testing.assert_allclose(s.global_tensors[k], np.full(shapes[k], 3.0), atol=1e-5)
