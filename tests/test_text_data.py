"""Text datasets: the synthetic generator's heterogeneity, natural-id partitioning, hub loaders on local copies."""

import numpy as np
import pytest

from fedpers.config import DataConfig, PartitionerConfig
from fedpers.data import DataError, build_federated
from fedpers.data.text import SWAP, make_synthetic_text


def test_synthetic_is_fixed_and_heterogeneous():
    a, b = make_synthetic_text(8, 50), make_synthetic_text(8, 50)
    assert a == b  # independent of run.seed: every run sees the same data
    users = np.array(a["user"])
    labels = np.array(a["label"])
    conv = np.array(a["convention"])
    # label skew: users' label histograms differ a lot
    hists = np.stack([np.bincount(labels[users == u], minlength=4) / 50 for u in range(8)])
    assert np.abs(hists - hists.mean(0)).sum(1).mean() > 0.3
    # concept shift: a quarter of users use the swapped convention
    assert sorted({int(conv[users == u][0]) for u in range(8)}) == [0, 1]
    assert sum(int(conv[users == u][0]) for u in range(8)) == 2
    # feature shift: styles differ by user (shouty users write in upper case)
    styles = np.array(a["style"])
    shouty = [t for t, s in zip(a["text"], styles) if s == "shouty"]
    assert shouty and all(t == t.upper() for t in shouty)
    assert len(set(styles)) == 4
    assert SWAP.tolist() == [3, 2, 1, 0] and sorted(SWAP.tolist()) == [0, 1, 2, 3]


def test_natural_partition_gives_each_user_one_client():
    fed = build_federated(DataConfig(dataset="synthetic_text_small", partitioner=PartitionerConfig(name="natural_id", id_column="user")), 4, 0)
    assert len(fed.clients) == 4
    for c in fed.clients:
        assert isinstance(c.x_train[0], str) and len(c.x_train) == c.num_train
        assert c.num_train + len(c.y_test) == 24


def test_natural_partition_with_wrong_client_count_names_the_field():
    with pytest.raises(DataError, match="run.num_clients=4"):
        build_federated(DataConfig(dataset="synthetic_text_small", partitioner=PartitionerConfig(name="natural_id", id_column="user")), 3, 0)


def test_dirichlet_partition_works_on_text():
    fed = build_federated(DataConfig(dataset="synthetic_text", partitioner=PartitionerConfig(alpha=0.3)), 5, 0)
    assert sum(c.num_train + len(c.y_test) for c in fed.clients) == 16 * 80


@pytest.fixture(scope="module")
def agnews_like(tmp_path_factory):
    """An AG-News-shaped DatasetDict with a user column, saved like a hub download."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    texts = [f"story {i} about topic {i % 4}" for i in range(60)]
    feats = Features({"text": Value("string"), "label": ClassLabel(num_classes=4), "user": Value("int64")})
    ds = Dataset.from_dict({"text": texts, "label": [i % 4 for i in range(60)], "user": [i % 3 for i in range(60)]},
                           features=feats)
    path = tmp_path_factory.mktemp("agnews") / "ag_news"
    DatasetDict({"train": ds}).save_to_disk(str(path))
    return str(path)


def test_hub_text_loader_reads_a_local_copy_and_partitions_by_user(agnews_like):
    fed = build_federated(DataConfig(dataset="ag_news", path=agnews_like,
                                     partitioner=PartitionerConfig(name="natural_id", id_column="user")), 3, 0)
    assert fed.num_classes == 4
    for c in fed.clients:  # every client is one user: ids i % 3 fixed per client
        ids = {int(t.split()[1]) % 3 for t in list(c.x_train) + list(c.x_test)}
        assert len(ids) == 1


def test_hub_text_offline_says_how_to_use_a_local_copy():
    with pytest.raises(DataError, match="data.path"):
        build_federated(DataConfig(dataset="ag_news", partitioner=PartitionerConfig(name="iid")), 2, 0)
