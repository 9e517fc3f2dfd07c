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
OPTIONAL_METRIC_KEYS = ("val_loss", "val_accuracy", "num_val")


@dataclass
class Reply:
    """What a client sends back: deltas of the tensors it received, and its metrics."""

    partition_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Failure:
    """A sampled client that produced no usable reply. ``kind``: error | timeout | missing | invalid.

    ``code`` says why an ``invalid`` reply was rejected (one of :data:`REJECTION_CODES`), so tests and
    ledgers can match on a stable word instead of the human-readable ``reason``.
    """

    partition_id: int
    kind: str
    reason: str
    code: str = ""


# Timed-out and silent clients are one ledger column: from the server's side both never answered in time.
TIMED_OUT_KINDS = ("timeout", "missing")
REJECTION_CODES = ("keys", "type", "dtype", "shape", "nonfinite", "num_examples", "size", "metrics", "partition",
                   "norm")


class Rejection(str):
    """The reason a reply was rejected (a str, for messages) with its category in ``code``."""

    code: str

    def __new__(cls, code: str, text: str) -> Rejection:
        assert code in REJECTION_CODES, code
        obj = super().__new__(cls, text)
        obj.code = code
        return obj


def serialized_nbytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the arrays as serialized on the wire (``np.save`` format, as Flower's ``Array``):
    the format header plus the data, computed without serializing (an oversize reply costs no copy,
    and an object array, which ``np.save`` refuses, still has a size)."""
    total = 0
    for a in arrays.values():
        a = np.asarray(a)
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(a))
        total += buf.tell() + a.nbytes
    return total


def delta_norm(arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of all arrays jointly, in float64 (a float32 sum of squares of 3e38 would itself overflow)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


def validate_reply(reply: Reply, spec: dict[str, tuple[int, ...]], max_bytes: int,
                   max_norm: float = math.inf) -> Rejection | None:
    """Return None if ``reply`` is acceptable, else the reason it is rejected. Never raises on a
    malformed reply: whatever a client sent, the answer is a typed :class:`Rejection`."""
    if not isinstance(reply.arrays, dict):
        return Rejection("type", f"arrays: not a mapping ({type(reply.arrays).__name__})")
    if not isinstance(reply.metrics, dict):
        return Rejection("metrics", f"metrics: not a mapping ({type(reply.metrics).__name__})")
    keys = set(reply.arrays)
    if keys != set(spec):
        missing, extra = sorted(set(spec) - keys), sorted(keys - set(spec))
        return Rejection("keys", f"keys: missing {missing}, unexpected {extra}")
    for name in spec:
        if not isinstance(reply.arrays[name], np.ndarray):
            return Rejection("type", f"{name}: not an array ({type(reply.arrays[name]).__name__})")
    # Size before content: an oversize payload is refused as such, whatever else is wrong with it.
    size = serialized_nbytes(reply.arrays)
    if size > max_bytes:
        return Rejection("size", f"size: {size} bytes exceeds run.max_upload_mb ({max_bytes} bytes)")
    for name, shape in spec.items():
        a = reply.arrays[name]
        if a.dtype != DTYPE:
            return Rejection("dtype", f"{name}: dtype {a.dtype}, expected {np.dtype(DTYPE)}")
        if tuple(a.shape) != tuple(shape):
            return Rejection("shape", f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
        if not np.isfinite(a).all():
            return Rejection("nonfinite", f"{name}: contains NaN or Inf")
    # Finite is not enough: one delta of 3e38 overflows any weighted sum it enters.
    norm = delta_norm(reply.arrays)
    if not norm <= max_norm:
        return Rejection("norm", f"delta L2 norm {norm:.3g} exceeds run.max_delta_norm={max_norm:g}")
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= MAX_NUM_EXAMPLES:
        return Rejection("num_examples", f"num_examples: {n!r} is not an integer in [1, {MAX_NUM_EXAMPLES}]")
    for key in METRIC_KEYS:
        v = reply.metrics.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return Rejection("metrics", f"metrics.{key}: {v!r} is not a finite number")
    for key in OPTIONAL_METRIC_KEYS:  # a client with a validation split (data.val_fraction) reports these
        v = reply.metrics.get(key)
        if key in reply.metrics and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            return Rejection("metrics", f"metrics.{key}: {v!r} is not a finite number")
    for key in ("test_accuracy", "val_accuracy"):
        if key in reply.metrics and not 0.0 <= reply.metrics[key] <= 1.0:
            return Rejection("metrics", f"metrics.{key}: {reply.metrics[key]} outside [0, 1]")
    return None
