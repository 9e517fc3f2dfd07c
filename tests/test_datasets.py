"""Hub dataset loaders, exercised on small local copies the tests write (the hub is offline here)."""

import json

import numpy as np
import pytest

from fedpers import simulate
from fedpers.config import DataConfig, PartitionerConfig
from fedpers.data import DataError, build_federated
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """A CIFAR-10-shaped DatasetDict (PIL 32x32 RGB images, 'img'/'label'), saved like a hub download."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    # Class-dependent colour so the task is learnable; uint8 like the real dataset.
    imgs = [np.clip(rng.normal(20 * y, 30, (32, 32, 3)), 0, 255).astype(np.uint8) for y in labels]
    feats = Features({"img": Image(), "label": ClassLabel(num_classes=10)})
    ds = Dataset.from_dict({"img": imgs, "label": labels.tolist()}, features=feats)
    path = tmp_path_factory.mktemp("cifar") / "cifar10"
    DatasetDict({"train": ds}).save_to_disk(str(path))
    return path, imgs


def test_local_copy_loads_as_scaled_chw_arrays(cifar_like):
    from fedpers.data.catalog import get_dataset_info

    path, imgs = cifar_like
    ds = get_dataset_info("cifar10").loader(str(path)).with_format("numpy")
    x = np.asarray(ds["image"])
    assert x.shape == (120, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], imgs[0].transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_local_copy_partitions_into_clients(cifar_like):
    path, _ = cifar_like
    data = DataConfig(dataset="cifar10", path=str(path), partitioner=PartitionerConfig(name="iid"))
    fed = build_federated(data, 4, 0)
    assert fed.num_classes == 10
    assert sum(c.num_train + len(c.y_test) for c in fed.clients) == 120
    assert tuple(fed.clients[0].x_train.shape[1:]) == (3, 32, 32)


def test_rgb_dataset_end_to_end_on_a_stock_timm_vit(cifar_like, tmp_path):
    path, _ = cifar_like
    out = tmp_path / "run"
    code = simulate.main(tiny_overrides(out, **{
        "data.dataset": "cifar10", "data.path": str(path), "data.partitioner.name": "iid",
        "model.backbone": "vit_tiny_patch16_224", "model.pretrained": "false", "model.img_size": 32,
        "model.num_prompts": 2, "run.rounds": 2}))
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rep = json.loads((out / "partitions" / "partitions.json").read_text())
    # the run trained on this data: every image of the local copy in some client, each client's reported
    # examples its own training split, and the training loss fell from round 1 to round 2
    assert sum(rep["num_train"]) + sum(rep["num_test"]) == 120
    for row in rows:
        assert {int(k): c["num_examples"] for k, c in row["clients"].items()} == dict(enumerate(rep["num_train"]))
    assert len(rows) == 2
    train_loss = [np.mean([c["train_loss"] for c in row["clients"].values()]) for row in rows]
    assert train_loss[1] < train_loss[0], train_loss


def test_hub_dataset_offline_says_how_to_use_a_local_copy():
    with pytest.raises(DataError, match="data.path"):
        build_federated(DataConfig(dataset="cifar100"), 2, 0)


def test_synthetic_images_are_deterministic_balanced_and_separable():
    from fedpers.data.catalog import get_dataset_info

    info = get_dataset_info("synthetic_images")
    a, b = info.loader(), info.loader()
    assert len(a) == 4000 and info.image_shape == (1, 8, 8) and info.num_classes == 10
    x = np.asarray(a.with_format("numpy")["image"])
    y = np.asarray(a.with_format("numpy")["label"])
    assert x.shape == (4000, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert np.bincount(y).tolist() == [400] * 10
    np.testing.assert_array_equal(x, np.asarray(b.with_format("numpy")["image"]))
    # Classes differ by their prototypes: the class means are far apart relative to the noise.
    means = np.stack([x[y == c].mean(0).ravel() for c in range(10)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(10, dtype=bool)]
    assert gaps.min() > 1.0


def test_an_unreachable_hub_is_detected_once_and_the_load_goes_offline(monkeypatch):
    """No network: one quiet connection attempt, then offline mode (the cache or an immediate error),
    instead of five logged retries with back-off."""
    import socket

    import datasets
    import huggingface_hub.constants as hub_constants

    from fedpers.data import datasets as fd

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    tries = []

    def unreachable(addr, timeout=None):
        tries.append(addr)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with fd._offline_unless_hub_reachable():
        assert datasets.config.HF_HUB_OFFLINE and hub_constants.HF_HUB_OFFLINE
    assert tries == [fd.HUB_HOST]
    assert not datasets.config.HF_HUB_OFFLINE and not hub_constants.HF_HUB_OFFLINE  # restored afterwards

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout=None: Conn())
    with fd._offline_unless_hub_reachable():  # reachable: the hub is used as usual
        assert not datasets.config.HF_HUB_OFFLINE
