"""Every registered dataset: importing this module imports each module that defines datasets, so the
look-ups below see them all (the registry's table itself is :mod:`fedpers.data.registry`)."""

from __future__ import annotations

from fedpers.data import datasets as _vision  # noqa: F401  (importing a defining module registers its datasets)
from fedpers.data import dialogue as _dialogue  # noqa: F401
from fedpers.data import text as _text  # noqa: F401
from fedpers.data.registry import DatasetInfo, _get, _list


def list_datasets() -> list[str]:
    return _list()


def get_dataset_info(name: str) -> DatasetInfo:
    """Raises KeyError naming the allowed datasets."""
    return _get(name)
