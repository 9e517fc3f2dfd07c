"""The dataset registry's table: :func:`register_dataset` writes it, and the modules that define
datasets (:mod:`~fedpers.data.datasets`, :mod:`~fedpers.data.text`, ...) call it at import.

Look datasets up through :mod:`fedpers.data.catalog`, which imports every defining module first; this
module imports none of them, so a defining module can import it without a loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    loader: Callable[[], "object"]
    description: str
    modality: str = "vision"  # vision: ``image`` column; text: ``text`` column (and optional ``user``); llm: dialogue (fedpers.data.dialogue)


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(name: str, num_classes: int, image_shape: tuple[int, ...], description: str,
                     modality: str = "vision"):
    def deco(fn):
        _REGISTRY[name] = DatasetInfo(name, num_classes, image_shape, fn, description, modality)
        return fn

    return deco


def _list() -> list[str]:
    return sorted(_REGISTRY)


def _get(name: str) -> DatasetInfo:
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; allowed: {', '.join(_list())}")
    return _REGISTRY[name]
