"""A real device's own data: what a SuperNode started with ``--node-config 'data-path=DIR'`` trains on.

Accepted layouts of ``DIR`` (labels must be the federation's label ids, 0..num_classes-1, of
``data.dataset``; images are resized to that dataset's image shape and channel count):

1. a ``datasets.DatasetDict`` saved with ``save_to_disk`` with ``train`` and ``test`` splits, each with
   ``image`` (PIL image or array, HxW, HxWxC or CxHxW) and ``label`` (int) columns. This is what
   ``python -m fedpers.export_partitions`` writes;
2. a single ``datasets.Dataset`` saved the same way: the device splits it into train/test itself with
   ``data.test_fraction``, seeded by ``run.seed`` and its partition id;
3. an image folder: ``DIR/train/<label>/*.png`` and ``DIR/test/<label>/*.png`` (any format PIL reads),
   or ``DIR/<label>/*.png`` to be split as in 2. ``<label>`` is the integer label id.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fedpers.data.config import DataConfig
from fedpers.data.catalog import get_dataset_info
from fedpers.data.partition import ClientData, DataError, _num_test

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_device_data(path: str, data: DataConfig, partition_id: int, seed: int) -> ClientData:
    """Cached per process: a SuperNode loads its folder once, not once per round."""
    return _load_cached(str(path), json.dumps(asdict(data), sort_keys=True), partition_id, seed)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, data_json: str, partition_id: int, seed: int) -> ClientData:
    data = json.loads(data_json)
    info = get_dataset_info(data['dataset'])
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"node-config data-path={path!r}: not a directory")
    splits = _read_splits(root, info.image_shape)
    if "train" in splits and "test" in splits:
        (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
        out = ClientData(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))
    else:
        # A device's data is already its own domain: no simulated shift is applied, only the seeded
        # train/test split the simulator uses.
        x, y = splits["all"]
        n_test = _num_test(len(y), data["test_fraction"])
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100_003 + partition_id))
        test, train = order[:n_test], order[n_test:]
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        out = ClientData(x[train], y[train], x[test], y[test])
    for name, labels in (("train", out.y_train), ("test", out.y_test)):
        if len(labels) == 0:
            raise DataError(f"data-path={path!r}: the {name} split is empty")
        bad = labels[(labels < 0) | (labels >= info.num_classes)]
        if len(bad):
            raise DataError(f"data-path={path!r}: {name} label {int(bad[0])} outside [0, {info.num_classes}) "
                            f"of data.dataset={data['dataset']!r}")
    return out


@functools.lru_cache(maxsize=4)
def check_device_folder(path: str) -> None:
    """Read every file of a device's data folder once, as the SuperNode starts (its first message), so
    a non-image file or a partial ``save_to_disk`` copy is one DataError naming the file, not a raw
    PIL/OSError inside every round. Shapes are the config's business (the server sends it); here
    images are decoded at a tiny size only to prove they can be."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"node-config data-path={path!r}: not a directory")
    _read_splits(root, (1, 4, 4))


def _read_splits(root: Path, shape: tuple[int, int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        try:
            return _read_saved(root, shape)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a partial or damaged copy: name it instead of failing in every round
            raise DataError(f"{root}: unreadable saved dataset (partial copy?): {type(e).__name__}: {e}") from None
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {s: _image_folder(root / s, shape) for s in ("train", "test")}
    return {"all": _image_folder(root, shape)}


def _read_saved(root: Path, shape: tuple[int, int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import datasets

    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        if not {"train", "test"} <= set(ds):
            raise DataError(f"{root}: a saved DatasetDict needs 'train' and 'test' splits, has {sorted(ds)}")
        return {s: _arrays(ds[s], root, shape) for s in ("train", "test")}
    return {"all": _arrays(ds, root, shape)}


def _arrays(ds, root: Path, shape) -> tuple[np.ndarray, np.ndarray]:
    missing = {"image", "label"} - set(ds.column_names)
    if missing:
        raise DataError(f"{root}: columns {ds.column_names}, missing {sorted(missing)}")
    ds = ds.with_format("numpy") if _is_array_column(ds) else ds
    images = np.stack([to_chw(img, shape) for img in ds["image"]]) if len(ds) else np.zeros((0, *shape), np.float32)
    return images.astype(np.float32), np.asarray(ds["label"], dtype=np.int64)


def _is_array_column(ds) -> bool:
    from datasets import Image

    return not isinstance(ds.features["image"], Image)


def _image_folder(root: Path, shape) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            label = int(label_dir.name)
        except ValueError:
            raise DataError(f"{label_dir}: image-folder class directories must be integer label ids") from None
        for f in sorted(label_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(f) as im:
                        xs.append(to_chw(im.copy(), shape))
                except Exception as e:  # noqa: BLE001 - PIL raises many types; any of them means this one file is bad
                    raise DataError(f"{f}: not a readable image ({type(e).__name__}: {e})") from None
                ys.append(label)
    if not xs:
        raise DataError(f"{root}: no images found (expected <label>/*.png folders)")
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


def to_chw(img, shape: tuple[int, int, int]) -> np.ndarray:
    """PIL image or array -> float32 (C, H, W) in [0, 1] with the dataset's channels and size."""
    c, h, w = shape
    if not isinstance(img, np.ndarray):  # PIL: convert mode and size there, exactly like an image viewer
        img = img.convert("L" if c == 1 else "RGB").resize((w, h))
    raw = np.asarray(img)
    arr = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3) and arr.shape[0] not in (1, 3):
        arr = arr.transpose(2, 0, 1)
    if arr.shape[0] != c:
        arr = arr.mean(0, keepdims=True) if c == 1 else np.repeat(arr[:1], c, 0)
    if arr.shape[1:] != (h, w):
        t = torch.nn.functional.interpolate(torch.from_numpy(arr)[None], size=(h, w), mode="bilinear",
                                            align_corners=False)
        arr = t[0].numpy()
    return arr
