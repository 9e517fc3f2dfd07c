"""Datasets (registry, offline defaults, hub loaders) and their federated partitioning."""

from fedpers.data.datasets import get_dataset_info, list_datasets, register_dataset
from fedpers.data.partition import ClientData, DataError, FederatedData, build_federated
from fedpers.data import text as _text  # noqa: F401,E402  (registers the text datasets)

__all__ = [
    "ClientData",
    "DataError",
    "FederatedData",
    "build_federated",
    "get_dataset_info",
    "list_datasets",
    "register_dataset",
]
