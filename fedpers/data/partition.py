"""Federated views of a dataset: flwr-datasets partitioners, one seeded train/test split per client.

The whole federation is built once per process (and per data config) and indexed by partition id, so
the Flower engine's clients and the in-process engine see exactly the same data.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedpers.config import DataConfig, PartitionerConfig
from fedpers.data.datasets import get_dataset_info


class DataError(ValueError):
    """The data cannot support the configured federation (e.g. a client with no test samples)."""


@dataclass
class ClientData:
    x_train: torch.Tensor | list[str]  # images (N, C, H, W), or strings for text datasets
    y_train: torch.Tensor
    x_test: torch.Tensor | list[str]
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])


@dataclass
class FederatedData:
    dataset: str
    num_classes: int
    image_shape: tuple[int, int, int]
    clients: list[ClientData]

    def label_counts(self) -> np.ndarray:
        """(num_clients, num_classes) label histogram over each client's train+test data."""
        out = np.zeros((len(self.clients), self.num_classes), dtype=np.int64)
        for i, c in enumerate(self.clients):
            labels = torch.cat([c.y_train, c.y_test]).numpy()
            out[i] = np.bincount(labels, minlength=self.num_classes)
        return out


def make_partitioner(p: PartitionerConfig, num_partitions: int, seed: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if p.name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if p.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=p.alpha,
            min_partition_size=p.min_partition_size,
            self_balancing=p.self_balancing,
            shuffle=True,
            seed=seed,
        )
    if p.name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=p.num_classes_per_partition,
            class_assignment_mode=p.class_assignment_mode,
            shuffle=True,
            seed=seed,
        )
    if p.name == "natural":
        return NaturalIdPartitioner(partition_by=p.partition_by)
    raise DataError(f"data.partitioner.name: unknown partitioner {p.name!r}")


def build_federated(data: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Cached per process: every client of a run shares one copy of the data."""
    return _build_cached(json.dumps(asdict(data), sort_keys=True), num_clients, seed)


@functools.lru_cache(maxsize=4)
def _build_cached(data_json: str, num_clients: int, seed: int) -> FederatedData:
    data = DataConfig(**{**json.loads(data_json)})
    data.partitioner = PartitionerConfig(**json.loads(data_json)["partitioner"])
    info = get_dataset_info(data.dataset)
    try:
        ds = info.loader(data.path)
    except Exception as e:  # hub/network/file errors all mean the same thing to the user
        hint = "" if data.path else " (no internet? save the dataset with Dataset.save_to_disk and set data.path)"
        raise DataError(f"data.dataset={data.dataset!r}: could not load{hint}: {type(e).__name__}: {e}") from e
    if data.partitioner.num_classes_per_partition > info.num_classes and data.partitioner.name == "pathological":
        raise DataError(
            f"data.partitioner.num_classes_per_partition={data.partitioner.num_classes_per_partition} exceeds "
            f"the {info.num_classes} classes of dataset {data.dataset!r}"
        )
    # IidPartitioner shards contiguously; shuffle first so it is a seeded random split.
    ds = ds.shuffle(seed=seed)
    partitioner = make_partitioner(data.partitioner, num_clients, seed)
    if data.partitioner.name == "natural":
        _check_natural(ds, data, num_clients)
    partitioner.dataset = ds
    clients = []
    for pid in range(num_clients):
        try:
            part = partitioner.load_partition(pid)
        except ValueError as e:
            raise DataError(f"partitioning {data.dataset!r} into {num_clients} clients failed: {e}") from e
        clients.append(_split(part, data, pid, seed))
    return FederatedData(data.dataset, info.num_classes, info.image_shape, clients)


def _check_natural(ds, data: DataConfig, num_clients: int) -> None:
    key = data.partitioner.partition_by
    if key not in ds.column_names:
        raise DataError(f"data.partitioner.partition_by={key!r}: dataset {data.dataset!r} has columns {ds.column_names}")
    n = len(set(ds[key]))
    if n != num_clients:
        raise DataError(f"data.partitioner.name=natural: dataset {data.dataset!r} has {n} distinct {key!r} values, "
                        f"so run.num_clients must be {n}, not {num_clients}")


def _split(part, data: DataConfig, pid: int, seed: int) -> ClientData:
    n = len(part)
    n_test = int(round(data.test_fraction * n))
    if n - n_test < 1 or n_test < data.min_test_size:
        raise DataError(
            f"client {pid} got {n} samples: too few for a train split and a test split of at least "
            f"data.min_test_size={data.min_test_size} (data.test_fraction={data.test_fraction}); "
            "use fewer clients, a larger data.partitioner.alpha or data.partitioner.min_partition_size"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + pid))
    test, train = order[:n_test], order[n_test:]
    y = torch.from_numpy(np.asarray(part["label"], dtype=np.int64))
    if "text" in part.column_names:  # text stays as strings; the model tokenises (and caches) them
        texts = list(part["text"])
        return ClientData([texts[i] for i in train.tolist()], y[train], [texts[i] for i in test.tolist()], y[test])
    part = part.with_format("numpy")
    x = torch.from_numpy(np.asarray(part["image"], dtype=np.float32))
    return ClientData(x[train], y[train], x[test], y[test])
