"""The strategy protocol and its registry.

A strategy is server-side logic plus a declaration of which client tensors travel:

- ``sends``: client tensors the server produces for each sampled client (e.g. ``("prompts",)``). The
  client starts local training from them and replies with ``delta/<name>`` = trained - received.
- ``personal``: tensors that stay on the client across rounds and never appear in any message
  (by default the linear head, ``head.weight`` and ``head.bias``). A client tensor in neither list is
  re-initialised every round. A strategy that keeps a private copy of a client tensor next to the
  one it sends (Ditto, APFL) names it ``personal.<name>``.
- ``broadcast`` (an instance attribute, name -> shape): tensors the server also sends that the client
  uses as they are and does not answer for (FedEx-LoRA's folded residual, pFedMoAP's expert prompts).

Client tensor names come from ``fedpers.client.client_tensor_shapes`` (``prompts``, ``head.weight``,
``head.bias``; ``deep_prompts`` for ``deep_prompts = True``; ``backbone.*`` for
``trains_backbone = True``); the server gets their shapes in ``shapes``. A strategy whose local objective differs
from plain joint training overrides the ``client_update`` classmethod, built from the blocks in
``fedpers.client`` (``start_tensors``, ``fit``, ``evaluate``, ``finish``).

Strategies never import Flower: the round loop in ``fedpers.rounds.server`` talks to any transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

HEAD = ("head.weight", "head.bias")


@dataclass
class StrategyConfig:
    name: str = "pfedpg"  # registered strategy (see the strategy table in the README)


@dataclass
class ClientUpdate:
    """A validated reply, as strategies see it."""

    partition_id: int
    deltas: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


class Strategy(ABC):
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    config_cls: ClassVar[type] = StrategyConfig
    sends: ClassVar[tuple[str, ...]] = ()
    personal: ClassVar[tuple[str, ...]] = HEAD
    deep_prompts: ClassVar[bool] = False  # clients train (depth, K, D) ``deep_prompts`` instead of ``prompts``
    trains_backbone: ClassVar[bool] = False  # backbone weights are client tensors (the server gets them at init)
    # What the strategy can run on (checked at config validation): model.modality and model.adapter.
    modalities: ClassVar[tuple[str, ...]] = ("vision", "text")
    adapters: ClassVar[tuple[str, ...]] = ("prompt", "prefix")

    @classmethod
    def tensor_roles(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(sends, personal)`` for these client tensors. Strategies whose tensor names depend on the
        model (LoRA factors are named after the modules they wrap) override this; the server and the
        client both call it, so they always agree."""
        return cls.sends, cls.personal

    @classmethod
    def client_update(cls, ctx, received: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        """Runs on the client: local training from ``received`` and the personal ``state``.
        Returns ``(Reply, new_state)``; ``new_state`` holds exactly the ``personal`` tensors."""
        from fedpers.client import default_client_update

        return default_client_update(cls, ctx, received, state)

    @classmethod
    def evaluate_model(cls, ctx, tensors) -> tuple[float, float]:
        """(loss, accuracy) of a client model (the tensors a client evaluated itself with) on ``ctx``'s
        test split; used by the cross-evaluation. Strategies whose prediction is not one forward pass
        with these tensors (per-instance mixtures, experts) override it."""
        from fedpers.client import evaluate

        return evaluate(ctx, tensors)

    # -- sizes from shapes alone (no allocation): the memory check (fedpers.safety) asks for them before
    # the strategy is built, so a huge generator or basis is refused instead of allocated.
    @classmethod
    def server_state_numel(cls, config: Any, *, num_clients: int, shapes: dict[str, tuple[int, ...]]) -> int:
        """How many numbers the server's state (:meth:`state_dict`: every float tensor of at least one
        dimension, optimizer moments included) holds once every client has taken part. Default: one copy
        of each tensor it sends (the global model of the averaging strategies)."""
        sends, _ = cls.tensor_roles(shapes)
        return numel([shapes[k] for k in sends])

    @classmethod
    def broadcast_shapes(cls, config: Any, *, num_clients: int,
                         shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The ``broadcast`` tensors (name -> shape) an instance will send; strategies that broadcast
        override it and set ``self.broadcast`` from it."""
        return {}

    def __init__(self, config: Any, *, num_clients: int, shapes: dict[str, tuple[int, ...]], seed: int,
                 init_std: float = 0.5):
        self.config = config
        self.init_std = init_std
        self.num_clients = num_clients
        self.shapes = dict(shapes)
        self.seed = seed
        self.sends, self.personal = type(self).tensor_roles(self.shapes)
        self.broadcast: dict[str, tuple[int, ...]] = {}

    def client_shapes(self, partition_id: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors exchanged with this client (hetlora: truncated to the client's rank)."""
        return {**self.shapes, **self.broadcast}

    def reply_spec(self, partition_id: int | None = None) -> dict[str, tuple[int, ...]]:
        """Exact keys and shapes a valid reply (from ``partition_id``) carries."""
        shapes = self.shapes if partition_id is None else self.client_shapes(partition_id)
        return {f"delta/{k}": tuple(shapes[k]) for k in self.sends}

    @abstractmethod
    def configure(self, server_round: int, partition_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Tensors to send each sampled client this round (keys == ``sends`` + ``broadcast``)."""

    @abstractmethod
    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Update server state from valid replies (sorted by partition id). Returns server metrics."""

    # Unseen clients (``run.holdout_clients``): after training, each held-out client takes part in a few
    # exchanges in which only its own state may change. The server state stays frozen, except that a
    # strategy may fit per-client server parameters of the new clients (a generator's descriptors).
    def configure_unseen(self, server_round: int, partition_ids: list[int]) -> dict[int, dict[str, np.ndarray]]:
        """Tensors for held-out clients; default: what a training client would get."""
        return self.configure(server_round, partition_ids)

    def adapt_unseen(self, server_round: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """Use held-out clients' replies without touching the trained state; default: ignore them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state)}")


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    both = set(cls.sends) & set(cls.personal)
    if both:
        raise ValueError(f"strategy {cls.name!r}: tensors {sorted(both)} cannot be both sent and personal")
    # The client reads what it trains from the strategy's config (fedpers.client.client_tensor_shapes),
    # so it never has to look the strategy up by name; the strategy class stays the one place it is set.
    for flag in ("deep_prompts", "trains_backbone"):
        setattr(cls.config_cls, flag, getattr(cls, flag))
    # Roles name only tensors the client has: an LLM client has no head, so HEAD in a strategy's roles
    # (or a strategy's own copy of it, e.g. APFL's ``personal.head.weight``) simply does not apply there
    # (one place, instead of every tensor_roles override). Other names a strategy adds (a local adapter,
    # a mixing weight) are its own and are kept.
    roles = cls.tensor_roles.__func__

    def present_roles(c, shapes):
        absent = [h for h in HEAD if h not in shapes]

        def keep(n):
            return not any(n == h or n.endswith("." + h) for h in absent)

        sends, personal = roles(c, shapes)
        return tuple(n for n in sends if keep(n)), tuple(n for n in personal if keep(n))

    cls.tensor_roles = classmethod(present_roles)
    _REGISTRY[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    return sorted(_REGISTRY)


def get_strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; allowed: {', '.join(list_strategies())}")
    return _REGISTRY[name]


def get_config_cls(name: str) -> type:
    return get_strategy_class(name).config_cls


def create_strategy(config: Any, **kwargs: Any) -> Strategy:
    return get_strategy_class(config.name)(config, **kwargs)


def numel(shapes) -> int:
    """Total number of elements of tensors of these shapes (Python ints: no overflow)."""
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= int(d)
        total += n
    return total


def weights_of(updates: list[ClientUpdate], weighting: str) -> np.ndarray:
    """Per-update aggregation weights summing to 1: ``uniform`` or by ``num_examples``."""
    if weighting == "num_examples":
        w = np.array([u.num_examples for u in updates], dtype=np.float64)
    else:
        w = np.ones(len(updates), dtype=np.float64)
    return w / w.sum()
