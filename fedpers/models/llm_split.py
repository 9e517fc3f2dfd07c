"""Exact cache of the frozen layers below an adapter that starts at layer L (DESIGN.md section 9).

When the adapter acts only from layer L up (LoRA on layers >= L through peft's ``layers_to_transform``,
or soft prompts that enter the hidden states at layer L), nothing below layer L depends on the client's
tensors: the hidden states entering layer L are the same in every round, for every client and every
strategy. They are computed once per example (without grad) and kept; each training step then runs only
layers L.. and the final norm, with the client's tensors.

The store is keyed by each row's real tokens (a hash of its ids up to its length), so it is shared by
every prepared list that holds the same example: the training caps of several settings, the seeds of a
sweep, and the models of one process built on the same backbone (``share``: LoRA and soft-prompt cells
of a grid reuse one another's rows). Rows are kept at their own length, so padding costs no memory; a
batch is assembled right-padded with zeros, which no real position reads (right padding and causal
attention).

The run of a span of layers follows the decoder body of Llama-style models (Llama, Mistral, Qwen2,
SmolLM2...): ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` and transformers' own
``create_causal_mask``. PeftCausalLM checks once, on a probe, that cached + upper layers equals the
model's own forward, and refuses the split otherwise, so another architecture can never be scored by
a silently different computation. Cached and uncached agree to float rounding (the frozen part is
computed in chunks of rows of similar length rather than on the training batch's own rows).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from fedpers.models.llm_chat import PreparedBatch
from fedpers.models.prompted import BackboneError

CHUNK_ROWS = 32  # the frozen part is computed in row chunks: one client's list never peaks at once


class Call(nn.Module):
    """``torch.func.functional_call`` runs a module's forward: this one runs ``fn`` with the peft model
    registered under it, so the client's tensors (named ``peft.<parameter>``) are substituted in the
    very modules ``fn`` calls."""

    def __init__(self, peft: nn.Module, fn):
        super().__init__()
        self.peft = peft
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class RowStore:
    """Least-recently-used hidden states per example row, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        v = self.rows.get(key)
        if v is not None:
            self.rows.move_to_end(key)
        return v

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = _nbytes(value)
        if size > self.budget or key in self.rows:
            return
        self._evict(self.budget - size)
        self.rows[key] = value
        self.bytes += size

    def resize(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self._evict(self.budget)

    def _evict(self, limit: int) -> None:
        """Drop the least recently used rows until at most ``limit`` bytes are held."""
        while self.rows and self.bytes > limit:
            _, old = self.rows.popitem(last=False)
            self.bytes -= _nbytes(old)

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_SHARED: dict[tuple, RowStore] = {}  # (share key, start layer) -> the process's store for that backbone


class LayerSplit:
    def __init__(self, decoder: nn.Module, start: int, cache_mb: float = 1024.0, share: str | None = None):
        missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb", "config") if not hasattr(decoder, a)]
        if missing:
            raise BackboneError(f"llm.adapter_from_layer needs a Llama-style decoder; {type(decoder).__name__} "
                                f"has no {', '.join(missing)}")
        depth = int(decoder.config.num_hidden_layers)
        if not 0 < start < depth:
            raise BackboneError(f"llm.adapter_from_layer must be in 1..{depth - 1}, got {start}")
        self.decoder, self.start, self.depth = decoder, start, depth
        budget = int(cache_mb * 2**20)
        if share is None:
            self.store = RowStore(budget)
        else:
            self.store = _SHARED.setdefault((share, start), RowStore(budget))
            self.store.budget = max(self.store.budget, budget)
        self._keys: OrderedDict[int, tuple[PreparedBatch, list[bytes]]] = OrderedDict()
        self.hits = self.misses = 0

    def set_budget(self, cache_mb: float) -> None:
        self.store.resize(int(cache_mb * 2**20))

    def run(self, h: torch.Tensor, mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Layers ``lo..hi-1`` on hidden states ``h`` (N, T, H); the final norm when ``hi`` is the top."""
        from transformers.masking_utils import create_causal_mask

        dec = self.decoder
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        causal = create_causal_mask(dec.config, h, mask, None, position_ids=pos)
        rope = dec.rotary_emb(h, position_ids=pos)
        for layer in dec.layers[lo:hi]:
            out = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
        return dec.norm(h) if hi == self.depth else h

    @torch.no_grad()
    def frozen(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer ``start`` for any (N, T) ids and mask, uncached."""
        dec = self.decoder
        dev = dec.embed_tokens.weight.device  # the model's device (run.device); batches live on the CPU
        return torch.cat([self.run(dec.embed_tokens(ids[i:i + CHUNK_ROWS].to(dev)), mask[i:i + CHUNK_ROWS].to(dev),
                                   0, self.start) for i in range(0, len(ids), CHUNK_ROWS)])

    def _row_keys(self, parent: PreparedBatch) -> list[bytes]:
        hit = self._keys.get(id(parent))
        if hit is not None and hit[0] is parent:
            return hit[1]
        keys = [hashlib.blake2b(parent.ids[i, : int(n)].numpy().tobytes(), digest_size=16).digest()
                for i, n in enumerate(parent.lengths)]
        self._keys[id(parent)] = (parent, keys)  # the batch itself is kept: its id stays unique
        if len(self._keys) > 4096:  # ad-hoc batches (not selected from a prepared list) come and go
            self._keys.popitem(last=False)
        return keys

    def below(self, batch: PreparedBatch) -> torch.Tensor:
        """Hidden states entering layer ``start`` for the batch's rows: (N, T, H). A row not in the store
        sends every missing row of the prepared list it was selected from through the frozen layers
        (in chunks of similar length), so the list's later batches find theirs."""
        parent, rows = batch.source if batch.source is not None else (batch, None)
        keys = self._row_keys(parent)
        idx = list(range(len(parent))) if rows is None else [int(i) for i in rows]
        got = {i: self.store.get(keys[i]) for i in idx}
        if all(v is not None for v in got.values()):
            self.hits += 1
        else:
            self.misses += 1
            todo = [i for i in range(len(parent)) if self.store.get(keys[i]) is None]
            if sum(int(parent.lengths[i]) for i in todo) * self.decoder.config.hidden_size * 4 > self.store.budget:
                todo = [i for i in idx if got[i] is None]  # the list does not fit: just this batch's rows
            todo.sort(key=lambda i: int(parent.lengths[i]))
            for c in range(0, len(todo), CHUNK_ROWS):
                chunk = todo[c:c + CHUNK_ROWS]
                sub = parent.select(chunk)
                h = self.frozen(sub.ids, sub.mask)
                for j, i in enumerate(chunk):
                    v = h[j, : int(parent.lengths[i])].clone()
                    self.store.put(keys[i], v)
                    if i in got:
                        got[i] = v
        width = int(batch.ids.shape[1])
        first = next(iter(got.values()))
        out = first.new_zeros((len(idx), width, first.shape[-1]))
        for r, i in enumerate(idx):
            v = got[i]
            out[r, : min(width, v.shape[0])] = v[:width]
        return out

    def clear(self) -> None:
        self.store.clear()
        self._keys.clear()
        self.hits = self.misses = 0
