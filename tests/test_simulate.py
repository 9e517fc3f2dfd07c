"""The simulator end to end on the in-process engine: results folder, reproducibility, local weights."""

import json

import numpy as np
import pytest
import torch

from fedpers import simulate
from tests.conftest import tiny_overrides


def majority_class_accuracy(out) -> float:
    """Mean over clients of the accuracy of always predicting the client's most frequent training label."""
    from fedpers.experiment import from_yaml
    from fedpers.data import build_federated

    cfg = from_yaml((out / "config.yaml").read_text())
    fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    return float(np.mean([float((np.asarray(c.y_test) == np.bincount(np.asarray(c.y_train)).argmax()).mean())
                          for c in fed.clients]))


def test_run_writes_results_folder(tmp_path, capsys):
    out = tmp_path / "run"
    # iid labels: a client's majority class is near chance, so beating it means the model learned
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 3, "data.partitioner.name": "iid"})) == 0
    for name in ("config.yaml", "metrics.jsonl", "rounds.csv", "summary.json",
                 "accuracy_per_round.png", "accuracy_per_client.png"):
        assert (out / name).is_file(), name
    assert not (out / "tensorboard").exists()  # only with run.tensorboard=true
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == len(rows) == 3
    assert set(summary["final"]["per_client"]) == {"0", "1", "2"}
    # pFedPG sends K x D float32 prompts down and the same-shaped delta up (plus .npy header bytes).
    assert summary["params"] == {"down_per_client_round": 10 * 128, "up_per_client_round": 10 * 128}
    assert 10 * 128 * 4 < summary["bytes"]["up_per_client_round"] < 10 * 128 * 4 + 256
    # Each client's personal head could score its majority class's share of its test split by predicting
    # that class alone; the run must do clearly better than that on average, on every seed's data.
    assert summary["final"]["accuracy_mean"] > majority_class_accuracy(out) + 0.05
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] == str(out)
    # One wall_time_s: the console's is summary.json's; the whole command (data, backbone) is named apart.
    assert printed["wall_time_s"] == round(summary["wall_time_s"], 1)
    assert printed["command_time_s"] >= printed["wall_time_s"]
    # sample-weighted accuracy: sum of correct / sum of test samples, each client's test size from the
    # partition report; in rounds.csv every round carries it and the mean test loss of its clients
    n_test = json.loads((out / "partitions" / "partitions.json").read_text())["num_test"]
    per = summary["final"]["per_client"]
    hand = sum(per[str(i)] * n_test[i] for i in range(3)) / sum(n_test[i] for i in range(3))
    assert abs(summary["final"]["accuracy_weighted"] - hand) < 1e-9
    last = rows[-1]["clients"]
    header, *lines = (out / "rounds.csv").read_text().splitlines()
    got = dict(zip(header.split(","), lines[-1].split(",")))
    assert abs(float(got["test_loss_mean"]) - np.mean([c["test_loss"] for c in last.values()])) < 1e-9


def test_same_seed_same_results_other_seed_differs(tmp_path):
    def final(seed, name):
        out = tmp_path / name
        assert simulate.main(tiny_overrides(out, **{"run.seed": seed})) == 0
        return json.loads((out / "summary.json").read_text())["final"]["per_client"]

    a, b, c = final(0, "a"), final(0, "b"), final(1, "c")
    assert a == b
    assert a != c


def test_partial_participation_samples_per_round(tmp_path):
    out = tmp_path / "p"
    assert simulate.main(tiny_overrides(out, **{"run.num_clients": 4, "run.clients_per_round": 2,
                                               "run.rounds": 3})) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["sampled"]) == 2 == r["num_ok"] for r in rows)
    assert len({tuple(r["sampled"]) for r in rows}) > 1


def test_local_checkpoint_file_is_loaded(tmp_path):
    """model.checkpoint=PATH loads weights written by the test, not the bundled or hub ones."""
    import timm
    from safetensors.torch import save_file

    from fedpers.models.prompted import load_backbone

    vit = timm.create_model("vit_fedpers_digits", pretrained=False, num_classes=0)
    with torch.no_grad():
        for i, p in enumerate(vit.parameters()):
            p.copy_(torch.full_like(p, 0.01 * (i % 7)))
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))

    loaded = load_backbone("vit_fedpers_digits", True, str(path))
    for (k, want), got in zip(vit.state_dict().items(), loaded.vit.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=k)
    assert all(not p.requires_grad for p in loaded.parameters())

    out = tmp_path / "ckpt-run"
    assert simulate.main(tiny_overrides(out, **{"model.checkpoint": str(path), "run.rounds": 1})) == 0
    assert (out / "summary.json").is_file()


def test_bundled_weights_are_pretrained_not_random():
    import timm

    from fedpers.models.prompted import load_backbone

    pre = load_backbone("vit_fedpers_digits", True, None).vit.state_dict()
    rand = timm.create_model("vit_fedpers_digits", pretrained=False, num_classes=0).state_dict()
    diffs = [float((pre[k] - rand[k]).abs().max()) for k in rand if rand[k].numel() > 1]
    assert np.median(diffs) > 0.05


def test_bad_partition_fails_before_training_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "bad"
    code = simulate.main(tiny_overrides(out, **{"run.num_clients": 1000, "run.clients_per_round": 10}))
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "client" in err
    assert not (out / "metrics.jsonl").exists()


def test_unknown_hub_backbone_is_a_clear_error(tmp_path, capsys):
    code = simulate.main(tiny_overrides(tmp_path / "x", **{"model.backbone": "vit_does_not_exist"}))
    assert code == 2
    assert "model.backbone" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224"])
def test_hub_vit_without_internet_points_to_checkpoint(tmp_path, capsys, name):
    """Any timm ViT name works; pretrained weights need the hub, and the error says how to go offline."""
    code = simulate.main(tiny_overrides(tmp_path / "x", **{"model.backbone": name, "run.rounds": 1}))
    assert code == 2
    assert "model.checkpoint" in capsys.readouterr().err


def test_any_timm_vit_name_works(tmp_path):
    """A stock timm ViT (random init here; hub weights need internet) at a small input size."""
    out = tmp_path / "vit"
    code = simulate.main(tiny_overrides(out, **{"model.backbone": "vit_tiny_patch16_224", "model.pretrained": "false",
                                               "model.img_size": 32, "model.num_prompts": 2, "run.rounds": 1}))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["down_per_client_round"] == 2 * 192  # vit_tiny width
