"""Partitioning schemes: a registry of flwr-datasets partitioners, and the data-section validation.

Each scheme names the ``data.partitioner`` fields it reads, so ``--help`` and errors can say which knobs
matter. The partitioners themselves are flwr-datasets classes; this module only maps config to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpers.data.config import PARTITIONERS, SHIFTS, PartitionerConfig
from fedpers.errors import ConfigError

if TYPE_CHECKING:  # the run config composes this layer; the data layer never imports it
    from fedpers.config import ExperimentConfig

CLASS_ASSIGNMENT_MODES = ("first-deterministic", "random", "deterministic")
SMALL_CLIENT_POLICIES = ("error", "rebalance")
CONCEPT_MODES = ("permute", "group")


@dataclass(frozen=True)
class Scheme:
    name: str
    # (partitioner config, number of clients, seed, number of samples) -> flwr-datasets Partitioner
    build: Callable[[PartitionerConfig, int, int, int], object]
    fields: tuple[str, ...]  # data.partitioner fields this scheme reads
    summary: str


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(name: str, fields: tuple[str, ...], summary: str):
    def deco(fn):
        _SCHEMES[name] = Scheme(name, fn, fields, summary)
        return fn

    return deco


def list_schemes() -> list[str]:
    return list(_SCHEMES)


def get_scheme(name: str) -> Scheme:
    if name not in _SCHEMES:
        raise KeyError(f"unknown partitioner {name!r}; allowed: {', '.join(_SCHEMES)}")
    return _SCHEMES[name]


def equal_sizes(num_samples: int, num_clients: int) -> list[int]:
    base, extra = divmod(num_samples, num_clients)
    return [base + (1 if i < extra else 0) for i in range(num_clients)]


def _sizes(p: PartitionerConfig, n: int, num_samples: int) -> list[int]:
    return [int(s) for s in p.partition_sizes] if p.partition_sizes is not None else equal_sizes(num_samples, n)


# The data is shuffled with the run seed before partitioning, so the contiguous schemes (iid, size, linear,
# square, exponential) are seeded random splits too.
@register_scheme("iid", (), "uniform random split into equal sizes")
def _iid(p, n, seed, num_samples):
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=n)


@register_scheme("dirichlet", ("alpha", "min_partition_size", "self_balancing"),
                 "label skew: each class spread over clients by Dirichlet(alpha); sizes vary too")
def _dirichlet(p, n, seed, num_samples):
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(num_partitions=n, partition_by="label", alpha=p.alpha,
                                min_partition_size=p.min_partition_size, self_balancing=p.self_balancing,
                                shuffle=True, seed=seed)


@register_scheme("pathological", ("num_classes_per_partition", "class_assignment_mode"),
                 "label skew: each client holds only num_classes_per_partition classes")
def _pathological(p, n, seed, num_samples):
    from flwr_datasets.partitioner import PathologicalPartitioner

    return PathologicalPartitioner(num_partitions=n, partition_by="label",
                                   num_classes_per_partition=p.num_classes_per_partition,
                                   class_assignment_mode=p.class_assignment_mode, shuffle=True, seed=seed)


@register_scheme("shard", ("num_shards_per_partition", "shard_size", "keep_incomplete_shard"),
                 "label skew as in FedAvg's paper: label-sorted data cut into shards, a few per client")
def _shard(p, n, seed, num_samples):
    from flwr_datasets.partitioner import ShardPartitioner

    return ShardPartitioner(num_partitions=n, partition_by="label", num_shards_per_partition=p.num_shards_per_partition,
                            shard_size=p.shard_size, keep_incomplete_shard=p.keep_incomplete_shard,
                            shuffle=True, seed=seed)


@register_scheme("inner_dirichlet", ("alpha", "partition_sizes"),
                 "label skew with fixed client sizes: each client's labels ~ Dirichlet(alpha)")
def _inner_dirichlet(p, n, seed, num_samples):
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    return InnerDirichletPartitioner(partition_sizes=_sizes(p, n, num_samples), partition_by="label",
                                     alpha=p.alpha, shuffle=True, seed=seed)


@register_scheme("size", ("partition_sizes",), "quantity skew: the given number of samples per client")
def _size(p, n, seed, num_samples):
    from flwr_datasets.partitioner import SizePartitioner

    return SizePartitioner(partition_sizes=_sizes(p, n, num_samples))


@register_scheme("linear", (), "quantity skew: client i gets a share proportional to i + 1")
def _linear(p, n, seed, num_samples):
    from flwr_datasets.partitioner import LinearPartitioner

    return LinearPartitioner(num_partitions=n)


@register_scheme("square", (), "quantity skew: client i gets a share proportional to (i + 1)^2")
def _square(p, n, seed, num_samples):
    from flwr_datasets.partitioner import SquarePartitioner

    return SquarePartitioner(num_partitions=n)


@register_scheme("exponential", (), "quantity skew: client i gets a share proportional to e^(i + 1)")
def _exponential(p, n, seed, num_samples):
    from flwr_datasets.partitioner import ExponentialPartitioner

    return ExponentialPartitioner(num_partitions=n)


@register_scheme("natural_id", ("id_column",),
                 "natural split: one client per distinct value of the dataset's id_column (writer, device, domain)")
def _natural_id(p, n, seed, num_samples):
    import functools

    import flwr_datasets.partitioner.natural_id_partitioner as nip

    # Its index pass draws a tqdm bar on every build, also in --no-progress runs and in every sweep cell;
    # fedpers reports progress itself, so that module's bar is switched off (its only use of tqdm).
    if not isinstance(nip.tqdm, functools.partial):
        nip.tqdm = functools.partial(nip.tqdm, disable=True)
    return nip.NaturalIdPartitioner(partition_by=p.id_column)


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def validate_data(cfg: ExperimentConfig) -> None:
    """Checks of the ``data`` section that need the dataset's class count or the scheme registry."""
    from fedpers.data.catalog import get_dataset_info
    from fedpers.data.shift import TRANSFORMS

    d, p, s = cfg.data, cfg.data.partitioner, cfg.data.shift
    num_clients = cfg.run.num_clients
    num_classes = get_dataset_info(d.dataset).num_classes
    _require(p.name in _SCHEMES, "data.partitioner.name",
             f"unknown partitioner {p.name!r}; allowed: {', '.join(PARTITIONERS)}")
    _require(d.max_train_per_client >= 0, "data.max_train_per_client",
             f"must be >= 0 (0 = no cap), got {d.max_train_per_client}")
    _require(d.max_test_per_client >= 0, "data.max_test_per_client",
             f"must be >= 0 (0 = no cap), got {d.max_test_per_client}")
    _require(d.max_val_per_client >= 0, "data.max_val_per_client",
             f"must be >= 0 (0 = no cap), got {d.max_val_per_client}")
    _require(d.max_test_per_client == 0 or d.max_test_per_client >= d.min_test_size, "data.max_test_per_client",
             f"caps test splits below data.min_test_size={d.min_test_size}: got {d.max_test_per_client}")
    _require(d.dialogue.min_utterances >= 1, "data.dialogue.min_utterances",
             f"must be >= 1, got {d.dialogue.min_utterances}")
    _require(d.dialogue.context_turns >= 1, "data.dialogue.context_turns",
             f"must be >= 1 (an example's context is never empty), got {d.dialogue.context_turns}")
    if get_dataset_info(d.dataset).modality == "llm":
        _validate_dialogue(cfg)
    used = set(get_scheme(p.name).fields)
    if "alpha" in used:
        _require(p.alpha > 0, "data.partitioner.alpha", f"must be > 0, got {p.alpha}")
    if "min_partition_size" in used:
        _require(p.min_partition_size >= 0, "data.partitioner.min_partition_size",
                 f"must be >= 0, got {p.min_partition_size}")
    if "num_classes_per_partition" in used:
        _require(1 <= p.num_classes_per_partition <= num_classes, "data.partitioner.num_classes_per_partition",
                 f"must be in [1, {num_classes}] (dataset {d.dataset!r} has {num_classes} classes), "
                 f"got {p.num_classes_per_partition}")
        _require(p.class_assignment_mode in CLASS_ASSIGNMENT_MODES, "data.partitioner.class_assignment_mode",
                 f"unknown mode {p.class_assignment_mode!r}; allowed: {', '.join(CLASS_ASSIGNMENT_MODES)}")
    if "num_shards_per_partition" in used:
        _require(p.num_shards_per_partition is not None or p.shard_size is not None,
                 "data.partitioner.num_shards_per_partition", "set it or data.partitioner.shard_size (both are None)")
        _require(p.num_shards_per_partition is None or p.num_shards_per_partition >= 1,
                 "data.partitioner.num_shards_per_partition", f"must be >= 1, got {p.num_shards_per_partition}")
        _require(p.shard_size is None or p.shard_size >= 1, "data.partitioner.shard_size",
                 f"must be >= 1, got {p.shard_size}")
    if "partition_sizes" in used and p.partition_sizes is not None:
        _require(len(p.partition_sizes) == num_clients, "data.partitioner.partition_sizes",
                 f"needs run.num_clients={num_clients} values, got {len(p.partition_sizes)}")
        _require(all(v >= 1 for v in p.partition_sizes), "data.partitioner.partition_sizes",
                 f"every size must be >= 1, got {list(p.partition_sizes)}")
    if "id_column" in used:
        _require(bool(p.id_column), "data.partitioner.id_column", "must name a dataset column")

    _require(s.name in SHIFTS, "data.shift.name", f"unknown shift {s.name!r}; allowed: {', '.join(SHIFTS)}")
    _require(s.num_groups >= 0, "data.shift.num_groups", f"must be >= 0 (0 = one group per client), got {s.num_groups}")
    if s.name == "domain":
        bad = [t for t in s.transforms if t not in TRANSFORMS]
        _require(not bad, "data.shift.transforms", f"unknown transforms {bad}; allowed: {', '.join(TRANSFORMS)}")
        _require(len(s.transforms) > 0, "data.shift.transforms", f"must list at least one of: {', '.join(TRANSFORMS)}")
        _require(s.strength >= 0, "data.shift.strength", f"must be >= 0, got {s.strength}")
    if s.name == "concept":
        _require(s.concept_mode in CONCEPT_MODES, "data.shift.concept_mode",
                 f"unknown mode {s.concept_mode!r}; allowed: {', '.join(CONCEPT_MODES)}")
        _require(num_classes >= 2, "data.shift.name", f"concept shift needs >= 2 classes; {d.dataset!r} has {num_classes}")
        if s.concept_mode == "group":
            _require(2 <= s.num_label_groups < num_classes, "data.shift.num_label_groups",
                     f"must be in [2, {num_classes - 1}] (dataset {d.dataset!r} has {num_classes} classes), "
                     f"got {s.num_label_groups}")

    _require(0 < d.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}")
    _require(0 <= d.val_fraction < 1 and d.test_fraction + d.val_fraction < 1, "data.val_fraction",
             f"must be in [0, 1) with data.test_fraction + data.val_fraction < 1 (training data must remain), "
             f"got {d.val_fraction} (test_fraction {d.test_fraction})")
    _require(d.min_test_size >= 1, "data.min_test_size", f"must be >= 1, got {d.min_test_size}")
    _require(d.min_client_size >= 1, "data.min_client_size", f"must be >= 1, got {d.min_client_size}")
    _require(d.small_client_policy in SMALL_CLIENT_POLICIES, "data.small_client_policy",
             f"unknown policy {d.small_client_policy!r}; allowed: {', '.join(SMALL_CLIENT_POLICIES)}")


def _validate_dialogue(cfg: ExperimentConfig) -> None:
    """Dialogue datasets (modality llm): one client per speaker, and enough eligible speakers. Counting
    them parses the dataset (cached per process, a few seconds the first time)."""
    from fedpers.data.dialogue import dialogues_of, eligible_speakers, too_few_speakers

    d, p = cfg.data, cfg.data.partitioner
    _require(p.name == "natural_id", "data.partitioner.name",
             f"dataset {d.dataset!r} has one client per speaker; allowed: natural_id "
             f"(with data.partitioner.id_column=user), got {p.name!r}")
    _require(p.id_column == "user", "data.partitioner.id_column",
             f"dataset {d.dataset!r} splits by speaker; allowed: user, got {p.id_column!r}")
    _require(d.shift.name == "none", "data.shift.name",
             f"dataset {d.dataset!r} is dialogue, its speakers differ by nature; allowed: none, got {d.shift.name!r}")
    try:
        dia = dialogues_of(d.dataset, d.path)
    except Exception as e:  # a missing package or a bad copy in data.path
        raise ConfigError("data.path", f"dataset {d.dataset!r} could not load: {type(e).__name__}: {e}") from e
    m, n = d.dialogue.min_utterances, cfg.run.num_clients
    eligible = len(eligible_speakers(dia, m, d.min_client_size))
    _require(eligible >= n, "data.dialogue.min_utterances",
             too_few_speakers(d.dataset, eligible, len(dia.speakers), m, d.min_client_size, n))
