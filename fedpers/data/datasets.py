"""Dataset registry. Each loader takes ``path`` (``data.path``: a local copy, or None) and returns a
``datasets.Dataset`` with ``image`` and ``label`` columns.

Images are float32 arrays shaped (C, H, W) in [0, 1]. Loaders that need the hub keep the real
``datasets.load_dataset`` call (users have internet) and accept a local ``save_to_disk`` folder
instead; the default works offline.
"""

from __future__ import annotations

import contextlib

import numpy as np

# Fraction of scikit-learn's digits reserved as *unlabelled* source data for pretraining the default
# backbone. Those images never reach a federated client: the split is fixed (seed 0), independent of
# run.seed, so the backbone never saw any client's data.
DIGITS_SOURCE_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0


from fedpers.data.registry import register_dataset


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
    n_source = int(round(DIGITS_SOURCE_FRACTION * len(labels)))
    return images, labels, order[:n_source]


def digits_source_images() -> np.ndarray:
    """The unlabelled pretraining pool: disjoint from every client's data."""
    images, _, source_idx = _digits_split()
    return images[np.sort(source_idx)]


def _to_hf(images: np.ndarray, labels: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"image": images, "label": labels})


@register_dataset(
    "digits",
    num_classes=10,
    image_shape=(1, 8, 8),
    description="scikit-learn's bundled handwritten digits (8x8 grayscale, 10 classes), minus the "
    "25% held out as unlabelled backbone-pretraining data: 1,348 images. Offline.",
)
def load_digits_federated(path: str | None = None):
    images, labels, source_idx = _digits_split()
    keep = np.setdiff1d(np.arange(len(labels)), source_idx)
    return _to_hf(images[keep], labels[keep])


def make_synthetic_images(num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC 8x8 grayscale images of 10 classes: a fixed random prototype per class plus Gaussian
    noise (std 0.3), clipped to [0, 1]; labels cycle 0..9. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, size=(10, 1, 8, 8)).astype(np.float32)
    labels = np.arange(num_images) % 10
    noise = 0.3 * rng.standard_normal((num_images, 1, 8, 8))
    return np.clip(protos[labels] + noise, 0, 1).astype(np.float32), labels.astype(np.int64)


SYNTHETIC_IMAGES = 4000


@register_dataset(
    "synthetic_images",
    num_classes=10,
    image_shape=(1, 8, 8),
    description=f"SYNTHETIC: {SYNTHETIC_IMAGES:,} 8x8 images of 10 classes (a random prototype per class plus "
    "noise), shaped like digits so the default backbone takes them. For benchmarks with many clients "
    "(e.g. 200 clients x 20 samples) that digits is too small for; not a benchmark of accuracy. Offline.",
)
def load_synthetic_images(path: str | None = None):
    return _to_hf(*make_synthetic_images(SYNTHETIC_IMAGES))


HUB_HOST = ("huggingface.co", 443)


@contextlib.contextmanager
def _offline_unless_hub_reachable(timeout: float = 3.0):
    """Without a network, ``load_dataset`` retries the hub five times with back-off, logging every try
    (about 30 s of warnings) before it fails. One quiet connection attempt first: when the hub cannot be
    reached, load in offline mode, which reads the local cache if the dataset is there and fails at once
    otherwise."""
    import socket
    from unittest import mock

    import datasets
    import huggingface_hub.constants as hub_constants

    if datasets.config.HF_HUB_OFFLINE:
        yield
        return
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True):
        yield


def open_split(path: str, split: str, columns: tuple[str, ...]):
    """One split of a hub dataset (``datasets.load_dataset``, needs internet) or of a local
    ``save_to_disk`` folder, checked to have ``columns``."""
    from pathlib import Path

    import datasets

    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
    else:
        with _offline_unless_hub_reachable():
            ds = datasets.load_dataset(path, split=split)
    missing = [k for k in columns if k not in ds.column_names]
    if missing:
        raise ValueError(f"{path} has columns {ds.column_names}, missing {missing}")
    return ds


def load_hub_image_dataset(path: str, split: str = "train", image_key: str = "img", label_key: str = "label"):
    """Load an image classification dataset from the Hugging Face hub (needs internet) or a local
    folder saved with ``Dataset.save_to_disk``, as float (C, H, W) arrays in [0, 1]."""
    ds = open_split(path, split, (image_key, label_key))

    def convert(batch):
        out = []
        for img in batch[image_key]:
            raw = np.asarray(img)
            # 8-bit images (PIL, uint8 arrays) are scaled by the type's range, never by their content.
            arr = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
            if arr.ndim == 2:
                arr = arr[None]
            elif arr.ndim == 3 and arr.shape[-1] in (1, 3):
                arr = arr.transpose(2, 0, 1)
            out.append(arr)
        return {"image": out, "label": batch[label_key]}

    # Scalar columns such as a writer, client or domain id stay: the natural_id partitioner splits by them.
    drop = [c for c in ds.column_names if c in (image_key, label_key) or not _is_scalar(ds.features[c])]
    return ds.map(convert, batched=True, remove_columns=drop)


def _is_scalar(feature) -> bool:
    import datasets

    return isinstance(feature, (datasets.Value, datasets.ClassLabel))


@register_dataset(
    "cifar10",
    num_classes=10,
    image_shape=(3, 32, 32),
    description="CIFAR-10 train split from the Hugging Face hub (uoft-cs/cifar10). Needs internet.",
)
def load_cifar10(path: str | None = None):
    return load_hub_image_dataset(path or "uoft-cs/cifar10", image_key="img", label_key="label")


@register_dataset(
    "cifar100",
    num_classes=100,
    image_shape=(3, 32, 32),
    description="CIFAR-100 train split from the Hugging Face hub (uoft-cs/cifar100, fine labels). Needs internet.",
)
def load_cifar100(path: str | None = None):
    return load_hub_image_dataset(path or "uoft-cs/cifar100", image_key="img", label_key="fine_label")


@register_dataset(
    "fonts",
    num_classes=10,
    image_shape=(3, 32, 32),
    description="SYNTHETIC-RENDERED digits 0-9 at 32x32 RGB from 20 TrueType faces bundled with matplotlib, "
    "each in 3 rendering styles (seeded affine, stroke, blur, colours, noise): 25,200 images, columns "
    "face (20 values) and writer (face/style, 60 values) for natural_id. The letters are kept out as the "
    "vit_fedpers_fonts backbone's pretraining source. Generated in seconds, cached. Offline.",
)
def load_fonts(path: str | None = None):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from fedpers.data.fonts import font_digits, to_float

    d = font_digits()
    # Built as Arrow fixed-size lists: Dataset.from_dict converts a 4-D array row by row (minutes here).
    image = pa.array(to_float(d["image"]).reshape(-1))
    for k in d["image"].shape[:0:-1]:
        image = pa.FixedSizeListArray.from_arrays(image, k)
    table = pa.table({"image": image, "label": d["label"], "face": pa.array(d["face"].astype(str)),
                      "writer": pa.array(d["writer"].astype(str))})
    return Dataset(InMemoryTable(table))
