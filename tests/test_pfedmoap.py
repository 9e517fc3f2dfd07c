"""pFedMoAP: a client's experts are other clients' latest prompts (the nearest to its own, or the released
code's fixed shuffle); the client's forward mixes them through its gate, which
never leaves it; the mixture follows the gate."""

import numpy as np
import torch

from fedpers.experiment import load_config
from fedpers.rounds.server import build_strategy, run_server
from strategies import ClientUpdate, create_strategy, get_config_cls
from strategies.pfedmoap import moe_logits
from tests.conftest import tiny_overrides
from tests.test_feddpa import Spy

SHAPES = {"prompts": (1, 2), "head.weight": (3, 2), "head.bias": (3,)}


def test_server_sends_the_nearest_other_clients_prompts():
    cfg = get_config_cls("pfedmoap")(num_experts=2)
    cfg.validate()
    s = create_strategy(cfg, num_clients=4, shapes=SHAPES, seed=0)
    first = s.configure(1, [0, 1, 2, 3])
    assert not any(p["expert_mask"].any() for p in first.values())  # nobody has uploaded yet
    g = first[0]["prompts"]
    targets = {0: [[0.0, 0.0]], 1: [[1.0, 0.0]], 2: [[5.0, 5.0]], 3: [[0.0, 2.0]]}
    s.aggregate(1, [ClientUpdate(p, {"prompts": (np.array(t, np.float32) - g)}, 10, {}) for p, t in targets.items()])
    np.testing.assert_allclose(s.global_tensors["prompts"], [[1.5, 1.75]], rtol=1e-6)  # FedAvg start
    second = s.configure(2, [0, 2])
    # client 0 (at the origin): 1 at distance 1, 3 at distance 2, 2 far away; never itself
    np.testing.assert_array_equal(second[0]["experts"][:, 0], [targets[1][0], targets[3][0]])
    np.testing.assert_array_equal(second[0]["expert_mask"], [1, 1])
    # client 2 (5, 5): 3 (distance^2 34) then 1 (41)
    np.testing.assert_array_equal(second[2]["experts"][:, 0], [targets[3][0], targets[1][0]])


def test_mixture_follows_the_gate():
    t = {"head.weight": torch.eye(2), "head.bias": torch.zeros(2), "gate.q": torch.eye(2), "gate.k": torch.eye(2)}
    own, far = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # no expert: the local logits alone
    torch.testing.assert_close(moe_logits([own, far], torch.tensor([0.0]), t, 0.5, 10.0), own)
    # a gate that only matches the expert's direction routes the mixture to it
    t2 = {**t, "gate.q": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "gate.k": torch.eye(2)}
    out = moe_logits([own, far], torch.tensor([1.0]), t2, 0.5, 1000.0)
    torch.testing.assert_close(out, 0.5 * own + far, atol=1e-4, rtol=0)


def test_convex_variant_weighs_the_mixture_by_one_minus_lambda_and_the_paper_by_one():
    """pfedmoap sums lambda * local + MoE; pfedmoap_convex takes lambda * local + (1 - lambda) * MoE: on the
    same features and gate, the two differ by exactly lambda * MoE, and lambda = 1 leaves the local logits."""
    from strategies.pfedmoap import PFedMoAP, PFedMoAPConvex

    g = torch.Generator().manual_seed(0)
    t = {"head.weight": torch.randn(3, 4, generator=g), "head.bias": torch.randn(3, generator=g),
         "gate.q": torch.randn(4, 2, generator=g), "gate.k": torch.randn(4, 2, generator=g)}
    feats = [torch.randn(5, 4, generator=g) for _ in range(3)]
    mask, lam = torch.ones(2), 0.3
    local = feats[0] @ t["head.weight"].T + t["head.bias"]
    paper = moe_logits(feats, mask, t, lam, 10.0, PFedMoAP.weights(get_config_cls("pfedmoap")(lmbda=lam))[1])
    convex = moe_logits(feats, mask, t, lam, 10.0, PFedMoAPConvex.weights(get_config_cls("pfedmoap_convex")(lmbda=lam))[1])
    moe = paper - lam * local  # the mixture's logits, from the paper's sum
    torch.testing.assert_close(convex, lam * local + (1 - lam) * moe)
    assert not torch.allclose(convex, paper, atol=1e-3)
    torch.testing.assert_close(moe_logits(feats, mask, t, 1.0, 10.0, 0.0), local)


def test_gate_stays_local_and_experts_are_other_clients_uploads(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "moap", **{"strategy.name": "pfedmoap", "strategy.num_experts": 2}))
    t = Spy(cfg)
    run_server(cfg, t, build_strategy(cfg))
    for msgs in t.sent:
        assert not any(k.startswith("gate.") for a in msgs.values() for k in a)
    for replies in t.received:
        assert not any(k.startswith("delta/gate.") for r in replies.values() for k in r.arrays)
    assert all({"gate.q", "gate.k"} <= set(s) for s in t.states.values())
    uploads = {p: t.sent[0][p]["prompts"] + r.arrays["delta/prompts"] for p, r in t.received[0].items()}
    for pid, payload in t.sent[1].items():
        others = [u for p, u in uploads.items() if p != pid]
        for e in payload["experts"]:
            assert any(np.array_equal(e, u) for u in others)
            assert not np.array_equal(e, uploads[pid])


def test_random_selection_is_the_official_codes_fixed_shuffle():
    """expert_selection=random: the released code's rule (trainers/pfedmoap.py 296-297, 322-329): one shuffle
    of all clients fixed at start; a client gets the first K clients in it that have uploaded, never itself."""
    cfg = get_config_cls("pfedmoap")(num_experts=2, expert_selection="random")
    cfg.validate()
    s = create_strategy(cfg, num_clients=6, shapes=SHAPES, seed=3)
    order = list(s.order)
    assert sorted(order) == list(range(6))
    g = s.configure(1, [0])[0]["prompts"]
    uploads = {p: np.full((1, 2), float(p), np.float32) for p in (0, 1, 2, 4)}  # 3 and 5 never upload
    s.aggregate(1, [ClientUpdate(p, {"prompts": u - g}, 10, {}) for p, u in uploads.items()])
    sent = s.configure(2, [0, 1, 2, 4])
    for pid in (0, 1, 2, 4):
        want = [p for p in order if p in uploads and p != pid][:2]
        np.testing.assert_allclose(sent[pid]["experts"][:, 0, 0], [float(p) for p in want], atol=1e-6)
        np.testing.assert_array_equal(sent[pid]["expert_mask"], [1, 1])
    assert list(s.order) == order  # fixed for the run, not redrawn per round
    # the same uploads under the paper's nearest rule: client 4's experts are 2 then 1 (distances 2, 3)
    near = create_strategy(get_config_cls("pfedmoap")(num_experts=2), num_clients=6, shapes=SHAPES, seed=3)
    near.aggregate(1, [ClientUpdate(p, {"prompts": u - near.configure(1, [p])[p]["prompts"]}, 10, {})
                       for p, u in uploads.items()])
    np.testing.assert_allclose(near.configure(2, [4])[4]["experts"][:, 0, 0], [2.0, 1.0], atol=1e-6)


def moap_ctx(tmp_path, **extra):
    from fedpers.client import make_context

    cfg = load_config(None, tiny_overrides(tmp_path / "moap-ctx", **{"strategy.name": "pfedmoap",
                                                                      "strategy.num_experts": 2, **extra}))
    return make_context(cfg, 0, 2)


def expert_payload(ctx, seed):
    g = torch.Generator().manual_seed(seed)
    k, d = ctx.shapes["prompts"]
    return {"prompts": (torch.randn(k, d, generator=g) * 0.5).numpy(),
            "experts": (torch.randn(2, k, d, generator=g) * 2.0).numpy(),
            "expert_mask": np.ones(2, np.float32)}


def test_client_logits_mix_own_and_expert_features_through_the_gate(tmp_path):
    """The client's forward, written out by hand on the real model: features under its own prompt and under
    each expert prompt, a softmax gate over their cosine scores, lambda * head(own) + head(mixture)."""
    import torch.nn.functional as F

    from fedpers.client import batch_tokens, start_tensors
    from strategies.pfedmoap import PFedMoAP

    ctx = moap_ctx(tmp_path)
    received = expert_payload(ctx, 0)
    t = start_tensors(ctx, received, {})
    t.update(PFedMoAP._init_gate(ctx, {}))
    g = torch.Generator().manual_seed(1)
    t["head.weight"] = torch.randn(*t["head.weight"].shape, generator=g)
    t["head.bias"] = torch.randn(*t["head.bias"].shape, generator=g)
    t["experts"], t["expert_mask"] = torch.from_numpy(received["experts"]), torch.ones(2)
    tokens = batch_tokens(ctx, ctx.data.x_train)(torch.arange(6))
    got = PFedMoAP._logits(ctx, tokens, t)

    feats = [ctx.model.features_with(tokens, t)] + [
        ctx.model.features_with(tokens, {**t, "prompts": t["experts"][e]}) for e in range(2)]
    lam, scaling = ctx.cfg.strategy.lmbda, ctx.cfg.strategy.scaling
    q = feats[0] @ t["gate.q"]
    want = []
    for n in range(tokens.shape[0]):
        scores = torch.stack([scaling * F.cosine_similarity(q[n], f[n] @ t["gate.k"], dim=0) for f in feats])
        gate = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
        mixed = sum(gate[e] * feats[e][n] for e in range(3))
        want.append(lam * (t["head.weight"] @ feats[0][n] + t["head.bias"]) + t["head.weight"] @ mixed + t["head.bias"])
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # not vacuous: the experts' features differ from the client's own, and the gate spreads over them
    assert not torch.allclose(feats[1], feats[0], atol=1e-3)
    alone = lam * (feats[0] @ t["head.weight"].T + t["head.bias"]) + feats[0] @ t["head.weight"].T + t["head.bias"]
    assert not torch.allclose(got, alone, atol=1e-3)


def test_client_training_runs_through_the_experts_and_trains_the_gate(tmp_path):
    """The local training's forward must use the mixture: other expert prompts give another trained
    prompt, and the gate (which only the mixture reads) moves from its initialisation; without experts
    the gate gets no gradient and stays where it started. No weight decay, so only a gradient through the
    gate's scores can move it."""
    from strategies.pfedmoap import GATE, PFedMoAP

    ctx = moap_ctx(tmp_path, **{"client.weight_decay": 0.0})
    init_gate = PFedMoAP._init_gate(ctx, {})
    a = expert_payload(ctx, 0)
    b = {**a, "experts": expert_payload(ctx, 5)["experts"]}  # same start, other experts
    none = {**a, "expert_mask": np.zeros(2, np.float32)}
    replies = {}
    for name, received in (("a", a), ("b", b), ("none", none)):
        replies[name] = PFedMoAP.client_update(ctx, received, {})
    (ra, sa), (rb, _), (rn, sn) = replies["a"], replies["b"], replies["none"]
    assert not np.allclose(ra.arrays["delta/prompts"], rb.arrays["delta/prompts"], atol=1e-6)
    assert not np.allclose(ra.arrays["delta/prompts"], rn.arrays["delta/prompts"], atol=1e-6)
    for k in GATE:
        assert not np.allclose(sa[k], init_gate[k].numpy(), atol=1e-6), k  # trained through the mixture
        np.testing.assert_array_equal(sn[k], init_gate[k].numpy())  # no expert: the gate is unused
