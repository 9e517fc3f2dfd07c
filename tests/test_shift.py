"""Domain (feature) shift and concept (label) shift on top of a label-skew partition."""

import json

import numpy as np
import pytest
import torch

from fedpers.config import ShiftConfig

from fedpers.experiment import load_config
from fedpers.data import build_federated
from fedpers.data.partition import _build_cached
from fedpers.data.shift import TRANSFORMS, apply_domain, domain_params, label_map


def fed_for(*overrides, clients=4, seed=0, fresh=False):
    cfg = load_config(None, [f"run.num_clients={clients}", f"run.clients_per_round={clients}", f"run.seed={seed}",
                             "data.partitioner.name=iid", *overrides])
    if fresh:
        _build_cached.cache_clear()
    return build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)


def test_domain_shift_is_deterministic_per_client_and_keeps_labels():
    plain = fed_for()
    a = fed_for("data.shift.name=domain", fresh=True)
    b = fed_for("data.shift.name=domain", fresh=True)
    for cp, ca, cb in zip(plain.clients, a.clients, b.clients):
        assert torch.equal(ca.x_train, cb.x_train) and torch.equal(ca.x_test, cb.x_test)
        assert torch.equal(ca.y_train, cp.y_train) and torch.equal(ca.y_test, cp.y_test)
        assert not torch.allclose(ca.x_train, cp.x_train)  # the images really changed
        assert ca.x_train.min() >= 0 and ca.x_train.max() <= 1
    assert a.shift_info == b.shift_info
    params = [i["domain"] for i in a.shift_info]
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 4  # one domain per client
    assert all(set(p) == {"rotate", "contrast", "blur", "noise", "invert"} for p in params)


def test_other_seed_gives_other_domains():
    a = fed_for("data.shift.name=domain", seed=0).shift_info
    b = fed_for("data.shift.name=domain", seed=1).shift_info
    assert a != b


def test_groups_share_a_domain():
    info = fed_for("data.shift.name=domain", "data.shift.num_groups=2").shift_info
    assert [i["group"] for i in info] == [0, 1, 0, 1]
    assert info[0]["domain"] == info[2]["domain"] != info[1]["domain"]


def test_strength_zero_is_the_identity():
    plain = fed_for()
    zero = fed_for("data.shift.name=domain", "data.shift.strength=0")
    for cp, cz in zip(plain.clients, zero.clients):
        assert torch.equal(cp.x_train, cz.x_train)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_changes_images_deterministically(name):
    shift = ShiftConfig(name="domain", transforms=[name])
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    params = None
    for group in range(8):  # invert is a coin flip: find a group whose domain inverts
        params = domain_params(shift, seed=0, group=group, channels=3, image_size=8)
        if name != "invert" or params["invert"]:
            break
    y1 = apply_domain(x, params, seed=0, pid=1, split=0)
    y2 = apply_domain(x, params, seed=0, pid=1, split=0)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, x.clamp(0, 1))
    if name == "invert":
        torch.testing.assert_close(y1, 1 - x)
    if name == "noise":  # per-sample noise depends on the client, not only on its domain
        assert not torch.equal(y1, apply_domain(x, params, seed=0, pid=2, split=0))


def test_transform_magnitudes_do_not_depend_on_which_others_are_listed():
    full = domain_params(ShiftConfig(name="domain", transforms=list(TRANSFORMS)), 0, 3, 1, 8)
    only = domain_params(ShiftConfig(name="domain", transforms=["blur"]), 0, 3, 1, 8)
    assert only == {"blur": full["blur"]}


def test_concept_shift_permutes_labels_per_client():
    plain = fed_for()
    shifted = fed_for("data.shift.name=concept")
    maps = [np.array(i["label_map"]) for i in shifted.shift_info]
    for m in maps:
        assert sorted(m.tolist()) == list(range(10))  # a permutation
    assert len({tuple(m) for m in maps}) == 4  # different on every client
    for cp, cs, m in zip(plain.clients, shifted.clients, maps):
        assert torch.equal(cs.x_train, cp.x_train)  # same inputs ...
        assert torch.equal(cs.y_train, torch.from_numpy(m)[cp.y_train])  # ... other labels
        assert (cs.y_train != cp.y_train).float().mean() > 0.5


def test_concept_groups_merge_classes():
    shifted = fed_for("data.shift.name=concept", "data.shift.concept_mode=group", "data.shift.num_label_groups=3",
                      "data.shift.num_groups=2")
    info = shifted.shift_info
    assert info[0]["label_map"] == info[2]["label_map"] != info[1]["label_map"]
    for c in shifted.clients:
        assert set(torch.cat([c.y_train, c.y_test]).tolist()) == {0, 1, 2}
    m = label_map(ShiftConfig(name="concept", concept_mode="group", num_label_groups=3), 0, 0, 10)
    assert sorted(np.bincount(m).tolist()) == [3, 3, 4]


def test_concept_shift_is_visible_in_the_report():
    from fedpers.data.stats import report

    rep = report(fed_for("data.shift.name=concept"))
    assert rep["shift"]["label_disagreement"] > 0.5
    assert rep["heterogeneity"]["js_mean"] < 0.1  # iid labels: the label histograms cannot see concept shift
    assert report(fed_for("data.shift.name=concept", "data.shift.num_groups=1"))["shift"]["label_disagreement"] == 0


def test_shift_combines_with_label_skew():
    fed = fed_for("data.partitioner.name=dirichlet", "data.partitioner.alpha=0.3", "data.shift.name=domain")
    plain = fed_for("data.partitioner.name=dirichlet", "data.partitioner.alpha=0.3")
    assert (fed.label_counts() == plain.label_counts()).all()
    assert "domain" in fed.shift_info[0]


def test_label_permutation_is_invisible_to_private_zero_init_heads(tmp_path):
    """Documents a property the docs rely on: with private heads that start at zero, training is equivariant
    to relabelling, so concept_mode=permute changes nothing for such strategies (group mode does)."""
    from fedpers import simulate
    from tests.conftest import tiny_overrides

    def per_client(name, **extra):
        out = tmp_path / name
        assert simulate.main(tiny_overrides(out, **{"run.rounds": 1, "data.partitioner.name": "iid", **extra})) == 0
        return json.loads((out / "summary.json").read_text())["final"]["per_client"]

    plain = per_client("plain")
    assert per_client("permute", **{"data.shift.name": "concept"}) == plain
    assert per_client("group", **{"data.shift.name": "concept", "data.shift.concept_mode": "group",
                                  "data.shift.num_label_groups": 3}) != plain
