"""Datasets (registry, offline defaults, hub loaders) and their federated partitioning."""

from fedpers.data.datasets import get_dataset_info, list_datasets, register_dataset
from fedpers.data.partition import ClientData, DataError, FederatedData, build_federated

__all__ = [
    "ClientData",
    "DataError",
    "FederatedData",
    "build_federated",
    "get_dataset_info",
    "list_datasets",
    "register_dataset",
]
