"""Datasets (registry, offline defaults, hub loaders) and their federated partitioning.

The names below load on first use (PEP 562), so importing the leaf :mod:`fedpers.data.config` (which
:mod:`fedpers.config` composes into the run config) does not load the datasets, torch or the registries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ClientData": "fedpers.data.partition",
    "DataError": "fedpers.data.partition",
    "FederatedData": "fedpers.data.partition",
    "build_federated": "fedpers.data.partition",
    "get_dataset_info": "fedpers.data.catalog",
    "list_datasets": "fedpers.data.catalog",
    "register_dataset": "fedpers.data.registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from fedpers.data.catalog import get_dataset_info, list_datasets
    from fedpers.data.registry import register_dataset
    from fedpers.data.partition import ClientData, DataError, FederatedData, build_federated


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedpers.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
