"""pFedMoAP: a client's experts are other clients' latest prompts, the nearest to its own; its gate
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
