"""Federated views of a dataset: flwr-datasets partitioners, one seeded train/test split per client.

The whole federation is built once per process (and per data config) and indexed by partition id, so
the Flower engine's clients and the in-process engine see exactly the same data.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from fedpers.data.config import DataConfig, PartitionerConfig
from fedpers.data.catalog import get_dataset_info
from fedpers.errors import DataError  # noqa: F401  (re-exported: fedpers.data.DataError)

log = logging.getLogger("fedpers")
_ROW = "_fedpers_row"


@dataclass
class ClientData:
    # images (N, C, H, W); strings for text datasets; for dialogue datasets (modality llm) example dicts
    # {"context": [{"role", "content"}, ...], "target": str} (see fedpers.data.dialogue)
    x_train: torch.Tensor | list[str] | list[dict]
    y_train: torch.Tensor  # labels; llm: each example's conversation index (int64)
    x_test: torch.Tensor | list[str] | list[dict]
    y_test: torch.Tensor
    # data.val_fraction > 0: the validation split, carved from the non-test rows (None = no split)
    x_val: torch.Tensor | list[str] | list[dict] | None = None
    y_val: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def has_validation(self) -> bool:
        return self.y_val is not None and len(self.y_val) > 0

    def validation_view(self) -> ClientData:
        """This client with its validation split in the test split's place, so every evaluator (each
        strategy's included) scores validation through the code path that scores test."""
        if not self.has_validation:
            raise ValueError("this client has no validation split (data.val_fraction = 0)")
        return replace(self, x_test=self.x_val, y_test=self.y_val, x_val=None, y_val=None)


@dataclass
class FederatedData:
    dataset: str
    num_classes: int
    image_shape: tuple[int, int, int]
    clients: list[ClientData]
    # per client: its shift group and domain params or label map, samples moved in by rebalancing
    shift_info: list[dict] = field(default_factory=list)
    # per client, dialogue datasets: speaker id, messages, conversations on each side, examples before the cap
    client_info: list[dict] = field(default_factory=list)
    modality: str = "vision"  # the dataset's: vision | text | llm

    def label_counts(self) -> np.ndarray:
        """(num_clients, num_classes) label histogram over each client's train+test data. Dialogue
        datasets have no labels (y is a conversation index): one column, the client's example count."""
        if self.modality == "llm":
            return np.array([[len(c.y_train) + len(c.y_test)] for c in self.clients], dtype=np.int64)
        out = np.zeros((len(self.clients), self.num_classes), dtype=np.int64)
        for i, c in enumerate(self.clients):
            labels = torch.cat([c.y_train, c.y_test]).numpy()
            out[i] = np.bincount(labels, minlength=self.num_classes)
        return out


def make_partitioner(p: PartitionerConfig, num_partitions: int, seed: int, num_samples: int):
    """The flwr-datasets partitioner for ``data.partitioner`` (see :mod:`fedpers.data.schemes`)."""
    from fedpers.data.schemes import get_scheme

    try:
        return get_scheme(p.name).build(p, num_partitions, seed, num_samples)
    except KeyError as e:
        raise DataError(f"data.partitioner.name: {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise DataError(f"data.partitioner ({p.name}): {e}") from e


def build_federated(data: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Cached per process: every client of a run shares one copy of the data."""
    return _build_cached(json.dumps(asdict(data), sort_keys=True), num_clients, seed)


def _data_from_json(data_json: str) -> DataConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), json.loads(data_json)))


@functools.lru_cache(maxsize=4)
def _build_cached(data_json: str, num_clients: int, seed: int) -> FederatedData:
    from datasets import Dataset

    data = _data_from_json(data_json)
    info = get_dataset_info(data.dataset)
    if info.modality == "llm":  # dialogue: one client per speaker, split by conversation

        return _build_dialogue_federation(data, num_clients, seed)
    try:
        ds = info.loader(data.path)
    except Exception as e:  # hub/network/file errors all mean the same thing to the user
        hint = "" if data.path else " (no internet? save the dataset with Dataset.save_to_disk and set data.path)"
        raise DataError(f"data.dataset={data.dataset!r}: could not load{hint}: {type(e).__name__}: {e}") from e
    p = data.partitioner
    if p.name == "natural_id" and p.id_column not in ds.column_names:
        raise DataError(f"data.partitioner.id_column={p.id_column!r}: dataset {data.dataset!r} has no such column "
                        f"(columns: {', '.join(ds.column_names)})")
    # IidPartitioner and the size-based schemes cut contiguously; shuffle first so they are seeded random splits.
    ds = ds.shuffle(seed=seed)
    labels = np.asarray(ds["label"], dtype=np.int64)
    index_cols = {p.id_column: ds[p.id_column]} if p.name == "natural_id" else {}
    # Partition a light (label, row) table rather than the images: same result, no image copies.
    table = Dataset.from_dict({"label": labels, _ROW: np.arange(len(labels)), **index_cols})
    partitioner = make_partitioner(p, num_clients, seed, len(labels))
    partitioner.dataset = table
    if p.name == "natural_id" and partitioner.num_partitions != num_clients:
        raise DataError(f"data.partitioner.id_column={p.id_column!r} has {partitioner.num_partitions} distinct "
                        f"values: set run.num_clients={partitioner.num_partitions} (got {num_clients})")
    try:
        parts = [np.asarray(partitioner.load_partition(pid)[_ROW], dtype=np.int64) for pid in range(num_clients)]
    except (ValueError, KeyError) as e:
        raise DataError(f"partitioning {data.dataset!r} into {num_clients} clients with "
                        f"data.partitioner.name={p.name!r} failed: {e}") from e
    parts, moved = enforce_min_size(parts, data, seed)
    if "text" in ds.column_names:  # text stays as strings; the model tokenises (and caches) them
        inputs = np.asarray(ds["text"], dtype=object)
    else:
        inputs = _image_array(ds)
    clients, infos = [], []
    for pid, rows in enumerate(parts):
        client, shift_info = _split(inputs[rows], labels[rows], data, info.num_classes, pid, seed)
        client = cap_train(client, data.max_train_per_client, np.random.default_rng([seed, pid, _CAP_STREAM]))
        client = cap_test(client, data.max_test_per_client, np.random.default_rng([seed, pid, _TEST_CAP_STREAM]))
        clients.append(cap_val(client, data.max_val_per_client, np.random.default_rng([seed, pid, _VAL_CAP_STREAM])))
        infos.append({**shift_info, **({"rebalanced_in": moved[pid]} if moved.get(pid) else {})})
    return FederatedData(data.dataset, info.num_classes, info.image_shape, clients, infos, modality=info.modality)


_CAP_STREAM = 0xCA9
_TEST_CAP_STREAM = 0x7E57
_VAL_STREAM = 0x7A1
_VAL_CAP_STREAM = 0x7A1C


def cap_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``rows`` (0 = all): a seeded subsample, in the original order."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    return rows[np.sort(rng.choice(len(rows), size=cap, replace=False))]


def cap_train(client: ClientData, cap: int, rng: np.random.Generator) -> ClientData:
    """``data.max_train_per_client``: at most ``cap`` training samples (0 = all), a seeded subsample kept in
    its order; the test split is untouched."""
    n = client.num_train
    if cap <= 0 or n <= cap:
        return client
    keep = cap_rows(np.arange(n), cap, rng)
    x = client.x_train
    x = [x[i] for i in keep.tolist()] if isinstance(x, list) else x[torch.from_numpy(keep)]
    return replace(client, x_train=x, y_train=client.y_train[torch.from_numpy(keep)])


def cap_test(client: ClientData, cap: int, rng: np.random.Generator) -> ClientData:
    """``data.max_test_per_client``: at most ``cap`` test samples (0 = all), a seeded subsample in order."""
    n = len(client.y_test)
    if cap <= 0 or n <= cap:
        return client
    keep = cap_rows(np.arange(n), cap, rng)
    x = client.x_test
    x = [x[i] for i in keep.tolist()] if isinstance(x, list) else x[torch.from_numpy(keep)]
    return replace(client, x_test=x, y_test=client.y_test[torch.from_numpy(keep)])


def cap_val(client: ClientData, cap: int, rng: np.random.Generator) -> ClientData:
    """``data.max_val_per_client``: at most ``cap`` validation samples (0 = all), a seeded subsample in
    order; no-op for a client without a validation split."""
    if not client.has_validation or cap <= 0 or len(client.y_val) <= cap:
        return client
    keep = cap_rows(np.arange(len(client.y_val)), cap, rng)
    x = client.x_val
    x = [x[i] for i in keep.tolist()] if isinstance(x, list) else x[torch.from_numpy(keep)]
    return replace(client, x_val=x, y_val=client.y_val[torch.from_numpy(keep)])


def _image_array(ds) -> np.ndarray:
    """The ``image`` column as one float32 array. Through Arrow when every image has one shape (a
    flatten, not the per-row conversion of ``with_format("numpy")``, which takes minutes on 25k images)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.with_format("arrow")["image"]
    flat = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    shape = [len(flat)]
    while len(flat) and (pa.types.is_fixed_size_list(flat.type) or pa.types.is_list(flat.type)):
        lengths = pc.list_value_length(flat)
        if flat.null_count or pc.min(lengths).as_py() != pc.max(lengths).as_py():
            break  # ragged or missing: let numpy say what is wrong
        shape.append(pc.min(lengths).as_py())
        flat = flat.flatten()
    if len(shape) == 4 and pa.types.is_floating(flat.type) and flat.null_count == 0:
        return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(shape)
    return np.asarray(ds.with_format("numpy")["image"], dtype=np.float32)


def _num_test(n: int, test_fraction: float) -> int:
    return int(round(test_fraction * n))


def required_size(data: DataConfig) -> int:
    """The smallest client that has data.min_client_size samples, a train sample and a full test split."""
    n = max(1, data.min_client_size)
    while (_num_test(n, data.test_fraction) < data.min_test_size or (data.val_fraction > 0 and _num_test(n, data.val_fraction) < 1)
           or n - _num_test(n, data.test_fraction) - _num_test(n, data.val_fraction) < 1):
        n += 1
    return n


def enforce_min_size(parts: list[np.ndarray], data: DataConfig, seed: int) -> tuple[list[np.ndarray], dict[int, int]]:
    """Apply data.small_client_policy. Rebalancing moves random samples from the currently largest client
    (seeded), so sizes still add up and no sample is duplicated. Returns parts and {pid: samples moved in}."""
    need = required_size(data)
    small = [pid for pid, rows in enumerate(parts) if len(rows) < need]
    if not small:
        return parts, {}
    sizes = ", ".join(f"client {pid}: {len(parts[pid])}" for pid in small[:5]) + (" ..." if len(small) > 5 else "")
    why = (f"{len(small)} client(s) have fewer than {need} samples, the least that gives data.min_client_size="
           f"{data.min_client_size} and a test split of data.min_test_size={data.min_test_size} at "
           f"data.test_fraction={data.test_fraction} ({sizes})")
    if data.small_client_policy == "error":
        raise DataError(why + "; use fewer clients, a larger data.partitioner.alpha or "
                        "data.partitioner.min_partition_size, or data.small_client_policy=rebalance")
    total = sum(len(r) for r in parts)
    if total < need * len(parts):
        raise DataError(why + f"; rebalancing cannot help: {total} samples for {len(parts)} clients")
    rng = np.random.default_rng([seed, 0x5B])
    parts = [r.copy() for r in parts]
    moved: dict[int, int] = {}
    for pid in small:
        while len(parts[pid]) < need:
            donor = int(np.argmax([len(r) for r in parts]))
            k = min(need - len(parts[pid]), len(parts[donor]) - need)
            take = rng.choice(len(parts[donor]), size=k, replace=False)
            parts[pid] = np.concatenate([parts[pid], parts[donor][take]])
            parts[donor] = np.delete(parts[donor], take)
            moved[pid] = moved.get(pid, 0) + k
    log.warning("data.small_client_policy=rebalance: moved samples into clients %s", moved)
    return parts, moved


def _split(x_all: np.ndarray, y_all: np.ndarray, data: DataConfig, num_classes: int, pid: int,
           seed: int) -> tuple[ClientData, dict]:
    from fedpers.data.shift import apply_shift

    n = len(y_all)
    n_test, n_val = _num_test(n, data.test_fraction), _num_test(n, data.val_fraction)
    y = torch.from_numpy(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + pid))
    # test first, then validation, then train: with data.val_fraction = 0 the splits are the ones before
    # validation existed, and the validation rows never depend on the strategy
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    splits = [train, test] + ([val] if n_val else [])
    if x_all.dtype == object:  # text: lists of strings (domain shift is image-only; validated at config time)
        xs = [[x_all[i] for i in rows.tolist()] for rows in splits]
        _, ys, shift_info = apply_shift(data.shift, seed, pid, num_classes, [None] * len(splits), [y[r] for r in splits])
    else:
        x = torch.from_numpy(x_all)
        xs, ys, shift_info = apply_shift(data.shift, seed, pid, num_classes, [x[r] for r in splits], [y[r] for r in splits])
    val_part = (xs[2], ys[2]) if n_val else (None, None)
    return ClientData(xs[0], ys[0], xs[1], ys[1], *val_part), shift_info


def _build_dialogue_federation(data, num_clients: int, seed: int):
    """One client per drawn speaker, by flwr-datasets' NaturalIdPartitioner on ``user``; split by
    conversation. ``data`` is a :class:`fedpers.data.config.DataConfig`."""
    import torch
    from datasets import Dataset

    from fedpers.data.dialogue import _SPLIT_STREAM, choose_speakers, dialogues_of, split_by_conversation

    info = get_dataset_info(data.dataset)
    try:
        d = dialogues_of(data.dataset, data.path)
    except Exception as e:
        raise DataError(f"data.dataset={data.dataset!r}: could not load: {type(e).__name__}: {e}") from e
    p, dl = data.partitioner, data.dialogue
    if p.name != "natural_id" or p.id_column != "user":
        raise DataError(f"data.partitioner.name={p.name!r}, id_column={p.id_column!r}: dataset {data.dataset!r} "
                        "has one client per speaker: use data.partitioner.name=natural_id with id_column=user")
    chosen = choose_speakers(d, data.dataset, dl.min_utterances, data.min_client_size, num_clients, dl.speaker_seed)
    rows = np.flatnonzero(d.is_example & np.isin(d.turn_speaker, chosen))
    table = Dataset.from_dict({"user": [d.speakers[s] for s in d.turn_speaker[rows]],
                               "label": np.zeros(len(rows), dtype=np.int64), _ROW: rows})
    partitioner = make_partitioner(p, num_clients, seed, len(rows))
    # Arrow format: NaturalIdPartitioner reads the id column whole, which datasets 4 otherwise converts
    # row by row (seconds per 100k rows).
    partitioner.dataset = table.with_format("arrow")
    assert partitioner.num_partitions == num_clients, (partitioner.num_partitions, num_clients)
    clients, client_info, no_val = [], [], []
    for pid in range(num_clients):
        turns = partitioner.load_partition(pid)[_ROW].to_numpy().astype(np.int64)
        spk = int(d.turn_speaker[turns[0]])
        assert (d.turn_speaker[turns] == spk).all()
        train, test = split_by_conversation(d, turns, data.test_fraction,
                                            np.random.default_rng([seed, spk, _SPLIT_STREAM]))
        val = np.zeros(0, dtype=np.int64)
        if data.val_fraction > 0:  # whole conversations of the non-test side, as the test split is cut
            try:
                train, val = split_by_conversation(d, train, data.val_fraction / (1 - data.test_fraction),
                                                   np.random.default_rng([seed, spk, _VAL_STREAM]))
            except ValueError:  # one conversation left for training: it stays whole, with no validation split
                no_val.append(pid)
        n_train_all = len(train)
        train = cap_rows(train, data.max_train_per_client, np.random.default_rng([seed, spk, _CAP_STREAM]))
        if len(test) < data.min_test_size:
            raise DataError(f"client {pid} (speaker {d.speakers[spk]}) has {len(test)} test examples, fewer than "
                            f"data.min_test_size={data.min_test_size}: raise data.test_fraction or "
                            "data.dialogue.min_utterances")
        test = cap_rows(test, data.max_test_per_client, np.random.default_rng([seed, spk, _TEST_CAP_STREAM]))
        val = cap_rows(val, data.max_val_per_client, np.random.default_rng([seed, spk, _VAL_CAP_STREAM]))
        clients.append(ClientData(
            [d.example(int(i), dl.context_turns) for i in train],
            torch.from_numpy(d.turn_conv[train].astype(np.int64)),
            [d.example(int(i), dl.context_turns) for i in test],
            torch.from_numpy(d.turn_conv[test].astype(np.int64)),
            *(([d.example(int(i), dl.context_turns) for i in val], torch.from_numpy(d.turn_conv[val].astype(np.int64)))
              if len(val) else (None, None)),
        ))
        client_info.append({"speaker": d.speakers[spk], "utterances": int(d.utterances[spk]),
                            "examples_before_cap": n_train_all,
                            "conversations_train": int(len(np.unique(d.turn_conv[train]))),
                            "conversations_test": int(len(np.unique(d.turn_conv[test])))})
    if no_val:
        log.warning("data.val_fraction=%s: %d speaker(s) have training replies in one conversation only, which "
                    "stays whole for training; they have no validation split and the validation means leave them "
                    "out: clients %s", data.val_fraction, len(no_val), no_val)
    return FederatedData(data.dataset, info.num_classes, info.image_shape, clients,
                         [{} for _ in clients], client_info=client_info, modality=info.modality)
