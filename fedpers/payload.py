"""The message schema both sides speak, and the checks every reply passes before it may touch the
server state. Transports (Flower, in-process) only move these objects."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

DTYPE = np.float32
MAX_NUM_EXAMPLES = 10_000_000
METRIC_KEYS = ("train_loss", "test_loss", "test_accuracy", "num_test")


@dataclass
class Reply:
    """What a client sends back: deltas of the tensors it received, and its metrics."""

    partition_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Failure:
    """A sampled client that produced no usable reply. ``kind``: error | timeout | missing | invalid."""

    partition_id: int
    kind: str
    reason: str


def serialized_nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays as serialized on the wire (``np.save`` format, as Flower's ``Array``)."""
    total = 0
    for a in arrays.values():
        buf = io.BytesIO()
        np.save(buf, np.asarray(a), allow_pickle=False)
        total += buf.getbuffer().nbytes
    return total


def validate_reply(reply: Reply, spec: dict[str, tuple[int, ...]], max_bytes: int) -> str | None:
    """Return None if ``reply`` is acceptable, else the reason it is rejected."""
    keys = set(reply.arrays)
    if keys != set(spec):
        missing, extra = sorted(set(spec) - keys), sorted(keys - set(spec))
        return f"keys: missing {missing}, unexpected {extra}"
    for name, shape in spec.items():
        a = reply.arrays[name]
        if not isinstance(a, np.ndarray):
            return f"{name}: not an array ({type(a).__name__})"
        if a.dtype != DTYPE:
            return f"{name}: dtype {a.dtype}, expected {np.dtype(DTYPE)}"
        if tuple(a.shape) != tuple(shape):
            return f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}"
        if not np.isfinite(a).all():
            return f"{name}: contains NaN or Inf"
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= MAX_NUM_EXAMPLES:
        return f"num_examples: {n!r} is not an integer in [1, {MAX_NUM_EXAMPLES}]"
    size = serialized_nbytes(reply.arrays)
    if size > max_bytes:
        return f"size: {size} bytes exceeds run.max_upload_mb ({max_bytes} bytes)"
    for key in METRIC_KEYS:
        v = reply.metrics.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return f"metrics.{key}: {v!r} is not a finite number"
    if not 0.0 <= reply.metrics["test_accuracy"] <= 1.0:
        return f"metrics.test_accuracy: {reply.metrics['test_accuracy']} outside [0, 1]"
    return None
