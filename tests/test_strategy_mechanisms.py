"""One test per strategy that fails when the mechanism defining it breaks, on cases small enough to check
by hand: FedRep's schedule, Ditto's proximal pull, APFL's interleaved step and alpha gradient, the exact
limits of apfl_fixed, FFA-LoRA's frozen A, FedSA-LoRA's private B, HetLoRA's aggregate, its self-pruning
penalty and its prune threshold (each alone), FedProx-LoRA's proximal term, FedAvg-FT's fine-tuning (evaluated,
never sent) and FedVPT-deep's per-block prompts.
(The one local budget every strategy gets is checked in the conformance suite.)"""


import numpy as np
import pytest
import torch

from fedpers import client as client_mod
from fedpers.client import local_budget, make_context
from fedpers.experiment import load_config
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import build_strategy, run_server
from strategies import ClientUpdate, create_strategy, get_config_cls, get_strategy_class
from strategies._avg import PERSONAL
from tests.conftest import text_tiny_overrides, tiny_overrides


def cfg_for(tmp_path, name, text=False, **extra):
    make = text_tiny_overrides if text else tiny_overrides
    over = {"strategy.name": name, **extra}
    return load_config(None, make(tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}", **over))


def run(cfg):
    s = build_strategy(cfg)
    t = InProcessTransport(cfg)
    summary = run_server(cfg, t, s)
    return summary, s, t


def record_fit(monkeypatch):
    """Wrap fedpers.client.fit: record (trainable names, steps taken, tensors after training) per call."""
    calls = []
    real = client_mod.fit

    def spy(ctx, tensors, trainable, epochs, *args, **kwargs):
        trainable = list(trainable)
        before = {k: v.detach().clone() for k, v in tensors.items()}
        losses = real(ctx, tensors, trainable, epochs, *args, **kwargs)
        calls.append({"trainable": trainable, "steps": len(losses), "before": before,
                      "after": {k: v.detach().clone() for k, v in tensors.items()}})
        return losses

    monkeypatch.setattr(client_mod, "fit", spy)
    return calls


# -- FedRep: head first with prompts frozen, then prompts with the head frozen, within one budget --

def test_fedrep_trains_head_then_prompts_each_with_the_other_frozen(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "fedrep", **{"client.local_epochs": 2})
    ctx = make_context(cfg, 0, 1)
    received = build_strategy(cfg).configure(1, [0])[0]
    calls = record_fit(monkeypatch)
    reply, state = get_strategy_class("fedrep").client_update(ctx, received, {})
    assert [c["trainable"] for c in calls] == [["head.weight", "head.bias"], ["prompts"]]
    head_phase, body_phase = calls
    # phase 1 leaves the prompts exactly as received; phase 2 leaves the head exactly as phase 1 left it
    torch.testing.assert_close(head_phase["after"]["prompts"], torch.from_numpy(received["prompts"]), rtol=0, atol=0)
    assert not torch.equal(head_phase["after"]["head.weight"], head_phase["before"]["head.weight"])
    torch.testing.assert_close(body_phase["after"]["head.weight"], head_phase["after"]["head.weight"], rtol=0, atol=0)
    assert not torch.equal(body_phase["after"]["prompts"], body_phase["before"]["prompts"])
    assert head_phase["steps"] + body_phase["steps"] == local_budget(ctx) == reply.metrics["local_steps"]
    np.testing.assert_array_equal(state["head.weight"], body_phase["after"]["head.weight"].numpy())


# -- Ditto: the personal copy is pulled toward the global model received this round --

def test_ditto_personal_model_follows_the_proximal_pull_to_the_received_global(tmp_path):
    def personal_distance(lam):
        cfg = cfg_for(tmp_path, "ditto", **{"strategy.lam": lam, "client.local_epochs": 2})
        ctx = make_context(cfg, 1, 2)
        received = build_strategy(cfg).configure(2, [1])[1]
        # a personal model far from the global one: only the proximal term can bring it back
        far = {PERSONAL + k: (v + 3.0).astype(np.float32) for k, v in received.items()}
        _, state = get_strategy_class("ditto").client_update(ctx, received, far)
        return float(np.sqrt(sum(((state[PERSONAL + k] - v) ** 2).sum() for k, v in received.items())))

    start = float(np.sqrt(sum(9.0 * v.size for v in build_strategy(
        cfg_for(tmp_path, "ditto")).configure(2, [1])[1].values())))
    free, pulled = personal_distance(0.0), personal_distance(5.0)
    assert pulled < 0.5 * free, (pulled, free)  # a flipped or missing pull would not close the gap
    assert pulled < 0.5 * start


# -- APFL: one step of Algorithm 1 on a quadratic, by hand --

def test_apfl_step_is_algorithm_1_and_alpha_follows_the_mixed_loss_gradient():
    from strategies.apfl import apfl_step

    c = torch.tensor([1.0, -2.0, 0.5])
    w0, v0, alpha, eta, eta_a = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 0.0, -1.0]), 0.3, 0.1, 0.05
    w, v = {"x": w0.clone().requires_grad_(True)}, {"x": v0.clone().requires_grad_(True)}
    opt_w, opt_v = torch.optim.SGD([w["x"]], lr=eta), torch.optim.SGD([v["x"]], lr=eta)
    _, new_alpha = apfl_step(w, v, alpha, lambda t: 0.5 * ((t["x"] - c) ** 2).sum(), opt_w, opt_v, eta_a)
    v_bar = alpha * v0 + (1 - alpha) * w0  # every gradient at the point before the step
    torch.testing.assert_close(w["x"].detach(), w0 - eta * (w0 - c))
    torch.testing.assert_close(v["x"].detach(), v0 - eta * alpha * (v_bar - c))
    grad_alpha = float(torch.dot(v0 - w0, v_bar - c))
    assert new_alpha == pytest.approx(alpha - eta_a * grad_alpha, rel=1e-6)
    assert (new_alpha - alpha) * grad_alpha < 0  # descent: against the gradient

    def mixed_loss(a):
        return float(0.5 * ((a * v0 + (1 - a) * w0 - c) ** 2).sum())

    assert mixed_loss(new_alpha) < mixed_loss(alpha)


def test_apfl_alpha_is_projected_to_unit_interval():
    from strategies.apfl import apfl_step

    w, v = {"x": torch.zeros(2, requires_grad=True)}, {"x": torch.full((2,), 10.0, requires_grad=True)}
    opts = [torch.optim.SGD([t["x"]], lr=0.0) for t in (w, v)]
    _, a = apfl_step(w, v, 0.5, lambda t: ((t["x"] - 20.0) ** 2).sum(), *opts, alpha_lr=10.0)
    assert a == 1.0  # the mixed loss wants more of v than alpha = 1 gives


def test_apfl_client_adapts_and_keeps_its_own_alpha(tmp_path):
    cfg = cfg_for(tmp_path, "apfl")
    cls = get_strategy_class("apfl")
    received = build_strategy(cfg).configure(1, [0, 1])
    alphas = {}
    for pid in (0, 1):
        reply, state = cls.client_update(make_context(cfg, pid, 1), received[pid], {})
        alphas[pid] = reply.metrics["alpha"]
        assert state[PERSONAL + "alpha"][0] == pytest.approx(alphas[pid])  # kept by the client
        # next round starts from the kept alpha, not the configured one
        again, _ = cls.client_update(make_context(cfg, pid, 2), received[pid], state)
        assert again.metrics["alpha"] != reply.metrics["alpha"]
    assert alphas[0] != alphas[1] and cfg.strategy.alpha not in alphas.values()


@pytest.mark.slow
def test_apfl_fixed_limits_are_fedavg_ft_and_local_on_half_the_budget(tmp_path):
    """apfl_fixed trains w on the first half of the budget, then v; at alpha = 0 it is fedavg_ft with half
    the epochs (same batches, same global model; with fedavg_ft's example-weighted average, apfl_fixed's
    default being APFL's uniform one), at alpha = 1 it is local training with half the epochs."""
    s0, a0, _ = run(cfg_for(tmp_path, "apfl_fixed", **{"strategy.alpha": 0.0, "client.local_epochs": 2,
                                                       "strategy.weighting": "num_examples"}))
    s_ft, ft, _ = run(cfg_for(tmp_path, "fedavg_ft", **{"client.local_epochs": 1}))
    assert s0["final"]["per_client"] == s_ft["final"]["per_client"]
    for k, v in ft.global_tensors.items():
        np.testing.assert_array_equal(a0.global_tensors[k], v)
    s1, _, _ = run(cfg_for(tmp_path, "apfl_fixed", **{"strategy.alpha": 1.0, "client.local_epochs": 2}))
    s_loc, _, _ = run(cfg_for(tmp_path, "local", **{"client.local_epochs": 1}))
    assert s1["final"]["per_client"] == s_loc["final"]["per_client"]
    assert s0["local_steps"]["per_client_round"] == 2 * s_ft["local_steps"]["per_client_round"]


# -- LoRA strategies --

def test_ffa_lora_never_changes_a(tmp_path, monkeypatch):
    from strategies.lora_common import lora_a

    cfg = cfg_for(tmp_path, "ffa_lora", text=True, **{"client.local_epochs": 3})
    cls = get_strategy_class("ffa_lora")
    ctx = make_context(cfg, 0, 1)
    calls = record_fit(monkeypatch)
    cls.client_update(ctx, build_strategy(cfg).configure(1, [0])[0], {})
    (call,) = calls
    frozen = cls.frozen_a(ctx.shapes, cfg.run.seed)
    assert lora_a(ctx.shapes) and not set(lora_a(ctx.shapes)) & set(call["trainable"])
    for k in lora_a(ctx.shapes):
        np.testing.assert_array_equal(call["after"][k].numpy(), frozen[k])
    assert any(not torch.equal(call["after"][k], call["before"][k]) for k in call["trainable"] if "lora_B" in k)


def test_fedsa_lora_b_stays_on_the_client_and_keeps_training(tmp_path):
    from strategies.lora_common import lora_b

    cfg = cfg_for(tmp_path, "fedsa_lora", text=True, **{"run.rounds": 2, "client.local_epochs": 2})
    s = build_strategy(cfg)
    assert not set(lora_b(s.shapes)) & set(s.sends) and set(lora_b(s.shapes)) <= set(s.personal)
    t = InProcessTransport(cfg)
    ctx = make_context(cfg, 0, 1)
    first = None
    for r in (1, 2):
        sent = s.configure(r, [0, 1, 2])
        assert all(not set(lora_b(s.shapes)) & set(a) for a in sent.values())
        replies = t.exchange(r, sent, timeout=600)
        assert all(not any("lora_B" in k for k in rep.arrays) for rep in replies.values())
        b_now = {k: t.states[0][k].copy() for k in lora_b(s.shapes)}
        if first is None:
            first = b_now
        s.aggregate(r, [ClientUpdate(p, {k[len("delta/"):]: v for k, v in rep.arrays.items()}, rep.num_examples,
                                     rep.metrics) for p, rep in sorted(replies.items())])
    init = {k: client_mod.initial_tensor(ctx, k).numpy() for k in lora_b(s.shapes)}
    assert any(not np.array_equal(first[k], init[k]) for k in init)  # trained in round 1
    assert any(not np.array_equal(b_now[k], first[k]) for k in init)  # and round 2 continued from it


def hetlora(ranks, r_max=4, weighting="sparsity"):
    shapes = {"m1.lora_A.weight": (r_max, 3), "m1.lora_B.weight": (2, r_max),
              "m2.lora_A.weight": (r_max, 5), "m2.lora_B.weight": (4, r_max), "head.weight": (2, 4), "head.bias": (2,)}
    cfg = get_config_cls("hetlora")(ranks=ranks, weighting=weighting)
    return create_strategy(cfg, num_clients=len(ranks), shapes=shapes, seed=0), shapes


@pytest.mark.parametrize("weighting", ["sparsity", "uniform"])
def test_hetlora_aggregate_is_the_weighted_mean_of_zero_padded_modules(weighting):
    s, shapes = hetlora([1, 2, 4], weighting=weighting)
    sent = s.configure(1, [0, 1, 2])
    rng = np.random.default_rng(0)
    trained = {p: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in sent[p].items()} for p in sent}
    s.aggregate(1, [ClientUpdate(p, {k: trained[p][k] - sent[p][k] for k in sent[p]}, 10 * (p + 1), {})
                    for p in (0, 1, 2)])
    for m in ("m1", "m2"):
        a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        padded = []
        for p, r in zip((0, 1, 2), (1, 2, 4)):  # zero-pad by hand
            pa, pb = np.zeros(shapes[a]), np.zeros(shapes[b])
            pa[:r], pb[:, :r] = trained[p][a], trained[p][b]
            padded.append((pa, pb))
        if weighting == "sparsity":
            norms = np.array([np.linalg.norm(pb @ pa) for pa, pb in padded])
            w = norms / norms.sum()
        else:
            w = np.ones(3) / 3
        np.testing.assert_allclose(s.shared.tensors[a], sum(wi * pa for wi, (pa, _) in zip(w, padded)), atol=1e-5)
        np.testing.assert_allclose(s.shared.tensors[b], sum(wi * pb for wi, (_, pb) in zip(w, padded)), atol=1e-5)
        # rank components only the rank-4 client held are scaled by its weight, not kept at full value
        assert np.abs(s.shared.tensors[a][2:]).max() < np.abs(trained[2][a][2:]).max()


def test_hetlora_server_takes_reported_ranks_and_never_grows_them():
    s, _ = hetlora([4, 4])
    sent = s.configure(1, [0, 1])
    zero = {p: {k: np.zeros_like(v) for k, v in sent[p].items()} for p in sent}
    s.aggregate(1, [ClientUpdate(0, zero[0], 5, {"rank": 3.0}), ClientUpdate(1, zero[1], 5, {"rank": 9.0})])
    assert (s.rank_of(0), s.rank_of(1)) == (3, 4)
    assert s.configure(2, [0])[0]["m1.lora_A.weight"].shape == (3, 3)
    assert s.reply_spec(0)["delta/m2.lora_B.weight"] == (4, 3)
    fresh, _ = hetlora([4, 4])
    fresh.load_state_dict(s.state_dict())
    assert fresh.rank_of(0) == 3


def hetlora_client(tmp_path, lam, threshold):
    """One rank-8 client round from factors as a later round sends them (B no longer zero, so the trailing
    components have a norm). Returns (reply, received, trained factors, kept rank k, module pairs)."""
    from strategies.lora_common import lora_a, lora_b

    cfg = cfg_for(tmp_path, "hetlora", text=True, **{
        "client.local_epochs": 2, "strategy.ranks": "[8]", "strategy.prune_lambda": lam,
        "strategy.prune_threshold": threshold})
    ctx = make_context(cfg, 0, 2)
    rng = np.random.default_rng(0)
    received = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
                for k, v in build_strategy(cfg).configure(2, [0])[0].items()}
    reply, _ = get_strategy_class("hetlora").client_update(ctx, received, {})
    trained = {k: torch.from_numpy(received[k] + reply.arrays[f"delta/{k}"]) for k in received}
    from strategies.hetlora import kept_rank

    return reply, received, trained, kept_rank(8, cfg.strategy.prune_gamma), list(zip(lora_a(ctx.shapes), lora_b(ctx.shapes)))


def test_hetlora_penalty_alone_shrinks_the_trailing_components(tmp_path):
    """Penalty on, threshold off (0: nothing is ever pruned): the same round with the penalty ends with
    smaller trailing components than without it, and nothing is pruned."""
    from strategies.hetlora import trailing_norm

    norms = {}
    for lam in (0.0, 1.0):
        reply, _, trained, k, pairs = hetlora_client(tmp_path, lam, 0.0)
        assert reply.metrics["rank"] == 8  # the threshold is off: no pruning, whatever the penalty did
        norms[lam] = float(trailing_norm(trained, pairs, k, 8))
        assert norms[lam] > 0
    assert norms[1.0] < 0.9 * norms[0.0], norms


def test_hetlora_threshold_alone_decides_pruning(tmp_path):
    """Penalty off: training is the same whatever the threshold, so the trailing norm's ratio after / before
    training is fixed; the client prunes exactly when that ratio is below prune_threshold."""
    from strategies.hetlora import trailing_norm

    reply, received, trained, k, pairs = hetlora_client(tmp_path, 0.0, 0.0)
    assert reply.metrics["rank"] == 8
    before = float(trailing_norm({n: torch.from_numpy(v) for n, v in received.items()}, pairs, k, 8))
    ratio = float(trailing_norm(trained, pairs, k, 8)) / before
    for threshold, prunes in ((1.01 * ratio, True), (0.99 * ratio, False)):
        reply, received, _, _, _ = hetlora_client(tmp_path, 0.0, threshold)
        assert reply.metrics["rank"] == (k if prunes else 8), (threshold, ratio)
        for a, b in pairs:
            for name in (a, b):
                t = received[name] + reply.arrays[f"delta/{name}"]
                tail = t[k:] if name == a else t[:, k:]
                assert (np.abs(tail).max() == 0) == prunes  # a pruned module carries no trailing components


# -- FedProx on LoRA: the proximal term mu/2 ||w - w_received||^2 is in the local loss --

def test_fedprox_lora_adds_the_proximal_term_and_it_pulls_toward_the_received_factors(tmp_path, monkeypatch):
    """The loss term the client trains with is (mu/2)||w - w_received||^2 over the LoRA factors: at
    w = w_received + d its value is mu/2 ||d||^2 and its gradient mu * d (FedProx, Li et al. 2020, eq. 2);
    and a strong mu keeps the trained factors far closer to what was received than mu = 0 does."""
    from strategies.lora_common import lora_a, lora_b

    calls = []
    real = client_mod.fit

    def spy(ctx, tensors, trainable, epochs, *args, **kwargs):
        calls.append(kwargs.get("extra_loss"))
        return real(ctx, tensors, trainable, epochs, *args, **kwargs)

    monkeypatch.setattr(client_mod, "fit", spy)
    cls = get_strategy_class("fedprox_lora")

    def round_with(mu):
        cfg = cfg_for(tmp_path, "fedprox_lora", text=True, **{"strategy.mu": mu, "client.local_epochs": 8})
        ctx = make_context(cfg, 0, 2)
        rng = np.random.default_rng(0)
        received = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
                    for k, v in build_strategy(cfg).configure(2, [0])[0].items()}
        reply, _ = cls.client_update(ctx, received, {})
        return ctx, received, reply

    mu = 30.0  # client.lr * mu = 0.9: a strong, stable pull
    ctx, received, reply = round_with(mu)
    prox = calls[-1]
    assert prox is not None
    names = lora_a(ctx.shapes) + lora_b(ctx.shapes)
    assert set(received) == set(names)
    d = {k: torch.from_numpy(np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)) for k, v in received.items()}
    w = {k: (torch.from_numpy(received[k]) + d[k]).requires_grad_(True) for k in names}
    w.update({"head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)})  # not part of the term
    value = prox(w)
    assert float(value) == pytest.approx(0.5 * mu * sum(float((d[k] ** 2).sum()) for k in names), rel=1e-5)
    grads = torch.autograd.grad(value, [w[k] for k in names])
    for k, g in zip(names, grads):
        torch.testing.assert_close(g, mu * d[k], rtol=1e-5, atol=1e-6)

    def moved(rep):
        return float(np.sqrt(sum((rep.arrays[f"delta/{k}"].astype(np.float64) ** 2).sum() for k in names)))

    _, _, free = round_with(0.0)
    assert moved(free) > 0
    assert moved(reply) < 0.5 * moved(free), (moved(reply), moved(free))


# -- FedAvg-FT: fine-tuning before evaluation, never in the reply --

def test_fedavg_ft_evaluates_the_fine_tuned_model_and_sends_only_the_local_training(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "fedavg_ft", **{"strategy.ft_epochs": 1, "client.local_epochs": 1})
    ctx = make_context(cfg, 0, 1)
    received = build_strategy(cfg).configure(1, [0])[0]
    calls = record_fit(monkeypatch)
    evaluated = []
    real_eval = client_mod.evaluate

    def spy_eval(ctx, tensors):
        evaluated.append({k: v.detach().clone() for k, v in tensors.items()})
        return real_eval(ctx, tensors)

    monkeypatch.setattr(client_mod, "evaluate", spy_eval)
    reply, state = get_strategy_class("fedavg_ft").client_update(ctx, received, {})
    assert len(calls) == 2  # local training, then the extra fine-tuning
    train, ft = calls
    sends = ("prompts", "head.weight", "head.bias")
    # the reply is the local training alone: trained - received, without the fine-tuning
    for k in sends:
        np.testing.assert_array_equal(reply.arrays[f"delta/{k}"],
                                      (train["after"][k] - torch.from_numpy(received[k])).numpy())
    # the fine-tuning starts where local training ended and moves the tensors further
    for k in sends:
        torch.testing.assert_close(ft["before"][k], train["after"][k], rtol=0, atol=0)
    assert any(not torch.equal(ft["after"][k], train["after"][k]) for k in sends)
    # the client evaluates (and reports) the fine-tuned model
    (ev,) = evaluated
    for k in sends:
        torch.testing.assert_close(ev[k], ft["after"][k], rtol=0, atol=0)
    assert (reply.metrics["test_loss"], reply.metrics["test_accuracy"]) == real_eval(ctx, ft["after"])
    assert reply.metrics["local_steps"] == train["steps"] + ft["steps"]
    assert state == {}  # nothing personal: the fine-tuned model is not kept either


# -- FedVPT-deep: prompts at every block travel, are averaged, and every block's prompts matter --

def test_fedvpt_deep_sends_trains_and_averages_every_layers_prompts(tmp_path):
    from fedpers.client import start_tensors

    cfg = cfg_for(tmp_path, "fedvpt_deep", **{"client.weight_decay": 0.0})  # only gradients move the prompts
    s = build_strategy(cfg)
    depth, k, dim = s.shapes["deep_prompts"]
    assert s.sends == ("deep_prompts",) and depth >= 3
    sent = s.configure(1, [0, 1, 2])
    assert all(set(a) == {"deep_prompts"} and a["deep_prompts"].shape == (depth, k, dim) for a in sent.values())
    replies = InProcessTransport(cfg).exchange(1, sent, timeout=600)
    for rep in replies.values():  # every block's prompts got a gradient
        delta = rep.arrays["delta/deep_prompts"]
        assert all(np.abs(delta[layer]).max() > 0 for layer in range(depth))
    start = s.global_tensors["deep_prompts"].copy()
    s.aggregate(1, [ClientUpdate(p, {"deep_prompts": r.arrays["delta/deep_prompts"]}, r.num_examples, r.metrics)
                    for p, r in sorted(replies.items())])
    n = np.array([replies[p].num_examples for p in sorted(replies)], float)
    mean = sum(wi * (start + replies[p].arrays["delta/deep_prompts"]) for wi, p in zip(n / n.sum(), sorted(replies)))
    np.testing.assert_allclose(s.global_tensors["deep_prompts"], mean, rtol=1e-5, atol=1e-6)
    # the client's forward reads a middle block's prompts (and the last block's)
    ctx = make_context(cfg, 0, 2)
    t = start_tensors(ctx, s.configure(2, [0])[0], {})
    t["head.weight"] = torch.randn(*t["head.weight"].shape, generator=torch.Generator().manual_seed(0))
    x = ctx.model.prepare(ctx.data.x_test[:8])
    base = client_mod.logits(ctx, x, t)
    for layer in (depth // 2, depth - 1):
        changed = {**t, "deep_prompts": t["deep_prompts"].clone()}
        # a random change (a constant shift of a token would vanish in the blocks' LayerNorms)
        changed["deep_prompts"][layer] += torch.randn(k, dim, generator=torch.Generator().manual_seed(layer))
        assert not torch.allclose(client_mod.logits(ctx, x, changed), base, atol=1e-4), layer
