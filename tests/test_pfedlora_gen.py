"""pfedlora_gen's server: generated factors match the formula, the update equals an independent float64
chain-rule re-derivation, and clients that pull toward a target pull the generator with them."""

import math

import numpy as np
import pytest
import torch

from strategies import ClientUpdate, create_strategy, get_config_cls

N, E, M = 4, 6, 3
SHAPES = {
    "l0.q.lora_A.weight": (2, 5), "l0.q.lora_B.weight": (3, 2),
    "l1.v.lora_A.weight": (2, 4), "l1.v.lora_B.weight": (5, 2),
    "head.weight": (4, 5), "head.bias": (4,),
}
LORA = [k for k in SHAPES if ".lora_" in k]


def make(server_optimizer="sgd", server_lr=0.1, weighting="uniform"):
    cfg = get_config_cls("pfedlora_gen")(server_optimizer=server_optimizer, server_lr=server_lr,
                                         weighting=weighting, bank_size=M, descriptor_dim=E)
    return create_strategy(cfg, num_clients=N, shapes=SHAPES, seed=0)


def params64(s) -> dict:
    return {k: v.detach().double().clone().requires_grad_(True) for k, v in s.generator.state_dict().items()}


def reference(p: dict, i: int) -> dict:
    """The formula written out for client i: per-module softmax over bank keys, mixtures of A and B."""
    q = p["w_q.weight"] @ p["descriptors"][i]
    out = {}
    for m, (a, b) in enumerate([(LORA[0], LORA[1]), (LORA[2], LORA[3])]):
        attn = torch.softmax(p["keys"][m] @ q / math.sqrt(E), dim=0)
        out[a] = sum(attn[j] * p[f"bank_a.{m}"][j] for j in range(M))
        out[b] = sum(attn[j] * p[f"bank_b.{m}"][j] for j in range(M))
    return out


def deltas(idx, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(SHAPES[k]).astype(np.float32) for k in LORA} for _ in idx]


def updates(idx, ds, sizes=None):
    sizes = sizes or [10] * len(idx)
    return [ClientUpdate(i, d, n, {}) for i, d, n in zip(idx, ds, sizes)]


def test_sends_every_lora_factor_and_starts_from_zero_b():
    s = make()
    assert set(s.sends) == set(LORA) and set(s.personal) == {"head.weight", "head.bias"}
    sent = s.configure(1, [0, 3])
    for pid in (0, 3):
        assert {k: v.shape for k, v in sent[pid].items()} == {k: SHAPES[k] for k in LORA}
        for k in LORA:
            if "lora_B" in k:  # B bases start at zero: every client starts at the frozen backbone
                assert not sent[pid][k].any()
            else:
                assert np.abs(sent[pid][k]).max() <= 1 / math.sqrt(SHAPES[k][1])


def test_generated_factors_match_the_formula():
    s = make()
    s.aggregate(1, updates([0, 1, 2, 3], deltas([0, 1, 2, 3])))  # make B bases non-zero first
    p = params64(s)
    sent = s.configure(2, [0, 2, 3])
    for pid in (0, 2, 3):
        ref = reference(p, pid)
        for k in LORA:
            np.testing.assert_allclose(sent[pid][k], ref[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_sgd_update_equals_reference_chain_rule(weighting):
    s = make("sgd", 0.1, weighting)
    s.aggregate(1, updates([0, 1, 2, 3], deltas([0, 1, 2, 3], seed=5)))
    idx, sizes = [0, 1, 3], [5, 20, 75]
    ds = deltas(idx)
    p = params64(s)
    w = np.array(sizes, float) / sum(sizes) if weighting == "num_examples" else np.ones(3) / 3
    # Client n's loss has gradient -delta_n w.r.t. its factors; the server descends sum_n w_n L_n.
    surrogate = sum(-wi * sum((torch.from_numpy(d[k]).double() * reference(p, i)[k]).sum() for k in LORA)
                    for wi, i, d in zip(w, idx, ds))
    surrogate.backward()
    expected = {k: (v - 0.1 * v.grad).detach().numpy() for k, v in p.items()}
    s.aggregate(2, updates(idx, ds, sizes))
    got = {k: v.double().numpy() for k, v in s.generator.state_dict().items()}
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(got["descriptors"][2], p["descriptors"][2].detach().numpy())


def _distance(s, target):
    sent = s.configure(0, list(range(N)))
    return float(np.mean([sum(np.linalg.norm(sent[i][k] - target[k]) for k in LORA) for i in range(N)]))


@pytest.mark.parametrize("opt, lr", [("sgd", 0.2), ("adam", 1e-2)])
def test_generator_moves_toward_clients_target(opt, lr):
    """Clients whose training always pulls their factors toward a fixed target: the generator follows."""
    s = make(opt, lr)
    rng = np.random.default_rng(3)
    target = {k: rng.standard_normal(SHAPES[k]).astype(np.float32) for k in LORA}
    idx = list(range(N))
    start = _distance(s, target)
    for r in range(1, 81):
        sent = s.configure(r, idx)
        s.aggregate(r, updates(idx, [{k: 0.5 * (target[k] - sent[i][k]) for k in LORA} for i in idx]))
    end = _distance(s, target)
    assert end < 0.5 * start, (start, end)


def test_flipped_sign_would_walk_away():
    s = make("sgd", 0.05)
    rng = np.random.default_rng(3)
    target = {k: rng.standard_normal(SHAPES[k]).astype(np.float32) for k in LORA}
    idx = list(range(N))
    start = _distance(s, target)
    for r in range(1, 4):
        sent = s.configure(r, idx)
        s.aggregate(r, updates(idx, [{k: -0.5 * (target[k] - sent[i][k]) for k in LORA} for i in idx]))
    end = _distance(s, target)
    assert np.isfinite(end) and end > start


def test_state_dict_round_trip_continues_identically():
    a = make("adam", 1e-2)
    idx = [0, 1, 2, 3]
    a.aggregate(1, updates(idx, deltas(idx, 1)))
    b = make("adam", 1e-2)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.aggregate(2, updates(idx, deltas(idx, 2)))
    for k, v in a.generator.state_dict().items():
        torch.testing.assert_close(b.generator.state_dict()[k], v, rtol=0, atol=0)


def test_needs_lora_tensors():
    cfg = get_config_cls("pfedlora_gen")()
    with pytest.raises(ValueError, match="model.adapter=lora"):
        create_strategy(cfg, num_clients=2, shapes={"prompts": (4, 8), "head.weight": (2, 8), "head.bias": (2,)},
                        seed=0)
