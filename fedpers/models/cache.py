"""Exact caches of frozen computation, one per process (like the backbone itself).

Two things a client recomputes every round do not depend on anything it trains:

- **tokens**: ``model.embed(model.prepare(x))``. For shallow prompts that is the patch + position
  embedding. ``embed`` is the model's contract for "everything below the first prompted layer", so a
  deep-prompt model whose prompts start at layer L makes its ``embed`` run ``blocks[:L]`` too and this
  cache then keeps those activations, with no change here.
- **frozen features**: ``model.features(tokens, prompts)`` when no backbone tensor is trained (head-only
  phases: linear probes, FedRep-style head epochs). One entry per (model, data) is kept and replaced
  when the prompts change, so stale prompts never pile up.

Entries are keyed by the identity of the backbone object and of the data tensor; both live for the
whole process (``load_backbone`` and ``build_federated`` are cached), and each entry holds references to
them so an id can never be reused by another object. Caching is exact: the cached tensor is the one the
uncached path computes from the same inputs (row-wise ops; a test pins cached == uncached). A memory
budget (``run.cache_mb``) bounds it: past the budget, clients are simply recomputed as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

# Embed in chunks so one client's huge split never materialises every intermediate at once.
EMBED_CHUNK = 256


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    over_budget: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "over_budget": self.over_budget, "bytes": self.bytes}


@dataclass
class _Entry:
    refs: tuple  # keeps the keyed objects alive so their ids stay unique
    value: torch.Tensor
    digest: bytes = b""


@dataclass
class FrozenCache:
    tokens_store: dict[tuple, _Entry] = field(default_factory=dict)
    features_store: dict[tuple, _Entry] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)

    def clear(self) -> None:
        self.tokens_store.clear()
        self.features_store.clear()
        self.stats = CacheStats()

    def _fits(self, nbytes: int, budget_mb: float) -> bool:
        if self.stats.bytes + nbytes > budget_mb * 1024 * 1024:
            self.stats.over_budget += 1
            return False
        return True


_CACHE = FrozenCache()


def process_cache() -> FrozenCache:
    return _CACHE


def _nbytes(t: torch.Tensor) -> int:
    return t.element_size() * t.nelement()


@torch.no_grad()
def embed_all(model, x: torch.Tensor) -> torch.Tensor:
    """Tokens of every image in ``x``, computed chunk by chunk (row-wise, so equal to per-batch)."""
    parts = [model.embed(model.prepare(x[i : i + EMBED_CHUNK])) for i in range(0, len(x), EMBED_CHUNK)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def tokens(run, model, x: torch.Tensor) -> torch.Tensor | None:
    """Cached tokens of ``x``, or None when caching is off or over budget (compute per batch then)."""
    if not run.cache:
        return None
    key = (id(model), id(x))
    hit = _CACHE.tokens_store.get(key)
    if hit is not None:
        _CACHE.stats.hits += 1
        return hit.value
    # Budget check before computing: the size is known from one image.
    probe = embed_all(model, x[:1])
    if not _CACHE._fits(_nbytes(probe) * len(x), run.cache_mb):
        return None
    _CACHE.stats.misses += 1
    value = embed_all(model, x)
    _CACHE.tokens_store[key] = _Entry((model, x), value)
    _CACHE.stats.bytes += _nbytes(value)
    return value


def digest(frozen: dict[str, torch.Tensor]) -> bytes:
    """Identity of the frozen backbone tensors (e.g. prompts) by value, so equal prompts hit."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(frozen):
        t = frozen[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.numpy().tobytes())
    return h.digest()


@torch.no_grad()
def frozen_features(run, model, x: torch.Tensor, frozen: dict[str, torch.Tensor],
                    features_fn) -> torch.Tensor | None:
    """``features_fn(tokens_of_x)`` for every row of ``x`` while the backbone tensors ``frozen`` stay
    fixed, cached per (model, x) and reused while their values are unchanged. None when caching is off."""
    if not run.cache:
        return None
    key = (id(model), id(x))
    d = digest(frozen)
    hit = _CACHE.features_store.get(key)
    if hit is not None and hit.digest == d:
        _CACHE.stats.hits += 1
        return hit.value
    toks = tokens(run, model, x)
    if toks is None:
        toks = embed_all(model, x)
    value = torch.cat([features_fn(toks[i : i + EMBED_CHUNK]) for i in range(0, toks.shape[0], EMBED_CHUNK)])
    _CACHE.stats.misses += 1
    if hit is not None:  # one entry per (model, x): features of older prompts are dropped
        del _CACHE.features_store[key]
        _CACHE.stats.bytes -= _nbytes(hit.value)
    if _CACHE._fits(_nbytes(value), run.cache_mb):
        _CACHE.features_store[key] = _Entry((model, x), value, d)
        _CACHE.stats.bytes += _nbytes(value)
    return value  # still exact (and still saves the per-epoch forwards) when over budget
