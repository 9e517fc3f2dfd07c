"""pFedPG's server update, checked against an independent float64 re-derivation of the chain rule."""

import math

import numpy as np
import pytest
import torch

from strategies import ClientUpdate, create_strategy, get_config_cls

K, D, N = 3, 8, 4


def make(server_optimizer="sgd", server_lr=0.1, weighting="uniform"):
    cfg = get_config_cls("pfedpg")(server_optimizer=server_optimizer, server_lr=server_lr, weighting=weighting)
    return create_strategy(cfg, num_clients=N, shapes={"prompts": (K, D)}, seed=0)


def reference_prompts(p: dict, idx: list[int]) -> torch.Tensor:
    """The pFedPG formula written out: softmax((d W_Q^T)(B W_K^T)^T / sqrt(D)) (B W_V^T) W_O^T."""
    d = p["descriptors"][idx]
    q = d @ p["w_q.weight"].T
    k = p["basis"] @ p["w_k.weight"].T
    v = p["basis"] @ p["w_v.weight"].T
    a = torch.softmax(q @ k.T / math.sqrt(D), dim=-1)
    return (a @ v) @ p["w_o.weight"].T


def params64(strategy) -> dict:
    return {k: v.detach().double().clone().requires_grad_(True) for k, v in strategy.generator.state_dict().items()}


def deltas_for(idx, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((K, D)).astype(np.float32) for _ in idx]


def updates(idx, deltas, sizes=None):
    sizes = sizes or [10] * len(idx)
    return [ClientUpdate(i, {"prompts": d}, n, {}) for i, d, n in zip(idx, deltas, sizes)]


def test_generated_prompts_match_the_formula():
    s = make()
    idx = [0, 2, 3]
    sent = s.configure(1, idx)
    ref = reference_prompts(params64(s), idx).detach().numpy()
    for i, pid in enumerate(idx):
        np.testing.assert_allclose(sent[pid]["prompts"], ref[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_sgd_update_equals_reference_chain_rule(weighting):
    s = make("sgd", 0.1, weighting)
    idx = [0, 1, 3]
    sizes = [5, 20, 75]
    deltas = deltas_for(idx)
    p = params64(s)
    w = np.array(sizes, float) / sum(sizes) if weighting == "num_examples" else np.ones(3) / 3
    # Client n's loss has gradient -delta_n w.r.t. its prompts; the server descends sum_n w_n L_n.
    surrogate = sum(-wi * (torch.from_numpy(d).double() * reference_prompts(p, [i])[0]).sum()
                    for wi, i, d in zip(w, idx, deltas))
    surrogate.backward()
    expected = {k: (v - 0.1 * v.grad).detach().numpy() for k, v in p.items()}

    s.aggregate(1, updates(idx, deltas, sizes))
    got = {k: v.double().numpy() for k, v in s.generator.state_dict().items()}
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Descriptors of clients that did not reply do not move.
    before = params64(make())["descriptors"].detach().numpy()
    np.testing.assert_array_equal(got["descriptors"][2], before[2])


def test_adam_two_steps_equal_reference_adam_on_weighted_chain_rule():
    """Adam is invariant to one global scale of the gradient (the SGD test pins the scale); what it does
    see is the relative weight of each client and each step. Unequal example counts and two rounds with
    different clients make a wrong per-client weight or a wrong step (or a moved absent descriptor) fail."""
    s = make("adam", 1e-2, "num_examples")
    p = params64(s)
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-2
    for t, (idx, sizes, seed) in enumerate((([1, 2], [5, 95], 7), ([0, 2], [60, 20], 8)), start=1):
        deltas = deltas_for(idx, seed=seed)
        w = np.array(sizes, float) / sum(sizes)
        surrogate = sum(-wi * (torch.from_numpy(d).double() * reference_prompts(p, [i])[0]).sum()
                        for wi, i, d in zip(w, idx, deltas))
        grads = torch.autograd.grad(surrogate, list(p.values()))
        with torch.no_grad():
            for (k, x), g in zip(p.items(), grads):
                new_m, new_v = b1 * m[k] + (1 - b1) * g, b2 * v2[k] + (1 - b2) * g * g
                step = lr * (new_m / (1 - b1 ** t)) / ((new_v / (1 - b2 ** t)).sqrt() + eps)
                if k == "descriptors":  # rows of clients that did not reply: no step, no moment update
                    absent = [r for r in range(N) if r not in idx]
                    step[absent], new_m[absent], new_v[absent] = 0, m[k][absent], v2[k][absent]
                m[k], v2[k] = new_m, new_v
                x -= step
        s.aggregate(t, updates(idx, deltas, sizes))
    got = s.generator.state_dict()
    for k, v in p.items():
        np.testing.assert_allclose(got[k].double().numpy(), v.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("opt, lr", [("sgd", 0.05), ("adam", 1e-2)])
def test_generator_moves_toward_clients_target(opt, lr):
    """Clients whose training always pulls prompts toward a fixed target: the generator must follow."""
    s = make(opt, lr)
    target = np.random.default_rng(3).standard_normal((K, D)).astype(np.float32)
    idx = list(range(N))

    def distance():
        sent = s.configure(0, idx)
        return float(np.mean([np.linalg.norm(sent[i]["prompts"] - target) for i in idx]))

    start = distance()
    for r in range(1, 61):
        sent = s.configure(r, idx)
        s.aggregate(r, updates(idx, [0.5 * (target - sent[i]["prompts"]) for i in idx]))
    end = distance()
    assert end < 0.5 * start, (start, end)


def test_flipped_sign_would_walk_away():
    """The same loop with negated deltas moves away: the sign test above is not vacuous."""
    s = make("sgd", 0.005)
    target = np.random.default_rng(3).standard_normal((K, D)).astype(np.float32)
    idx = list(range(N))
    sent = s.configure(0, idx)
    start = float(np.mean([np.linalg.norm(sent[i]["prompts"] - target) for i in idx]))
    for r in range(1, 4):
        sent = s.configure(r, idx)
        s.aggregate(r, updates(idx, [-0.5 * (target - sent[i]["prompts"]) for i in idx]))
    sent = s.configure(0, idx)
    end = float(np.mean([np.linalg.norm(sent[i]["prompts"] - target) for i in idx]))
    assert np.isfinite(end) and end > start


def test_state_dict_round_trip_continues_identically():
    a = make("adam", 1e-2)
    idx = [0, 1, 2, 3]
    a.aggregate(1, updates(idx, deltas_for(idx, 1)))
    b = make("adam", 1e-2)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.aggregate(2, updates(idx, deltas_for(idx, 2)))
    for k, v in a.generator.state_dict().items():
        torch.testing.assert_close(b.generator.state_dict()[k], v, rtol=0, atol=0)
