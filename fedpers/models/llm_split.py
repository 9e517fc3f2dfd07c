"""Exact cache of the frozen layers below a LoRA that starts at layer L (DESIGN.md section 9).

When LoRA adapts only layers >= L (peft's ``layers_to_transform``), nothing below layer L depends on
the client's tensors: the hidden states entering layer L are the same in every round and every
client's every epoch. They are computed once per prepared batch (all its rows, without grad) and
kept; each training step then runs only layers L.. and the final norm, with the client's tensors.

The run of a span of layers follows the decoder body of Llama-style models (Llama, Mistral, Qwen2,
SmolLM2...): ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` and transformers' own
``create_causal_mask``. PeftCausalLM checks once, on a probe, that cached + upper layers equals the
model's own forward, and refuses the split otherwise, so another architecture can never be scored by
a silently different computation. Cached and uncached agree to float rounding (the frozen part is
computed on the prepared batch's full padded width rather than a sub-batch's; right padding and
causal attention make the real positions' values the same computation).
"""

from __future__ import annotations

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


class LayerSplit:
    def __init__(self, decoder: nn.Module, start: int, cache_mb: float = 1024.0):
        missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb", "config") if not hasattr(decoder, a)]
        if missing:
            raise BackboneError(f"llm.lora_from_layer needs a Llama-style decoder; {type(decoder).__name__} "
                                f"has no {', '.join(missing)}")
        depth = int(decoder.config.num_hidden_layers)
        if not 0 < start < depth:
            raise BackboneError(f"llm.lora_from_layer must be in 1..{depth - 1}, got {start}")
        self.decoder, self.start, self.depth = decoder, start, depth
        self.budget = int(cache_mb * 2**20)
        self._store: OrderedDict[int, tuple[PreparedBatch, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

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
    def _frozen(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        dev = dec.embed_tokens.weight.device  # the model's device (run.device); batches live on the CPU
        return torch.cat([self.run(dec.embed_tokens(ids[i:i + CHUNK_ROWS].to(dev)), mask[i:i + CHUNK_ROWS].to(dev),
                                   0, self.start) for i in range(0, len(ids), CHUNK_ROWS)])

    def below(self, batch: PreparedBatch) -> torch.Tensor:
        """Hidden states entering layer ``start`` for the batch's rows: (N, T, H), from the cache of the
        prepared batch it was selected from."""
        parent, rows = batch.source if batch.source is not None else (batch, None)
        hit = self._store.get(id(parent))
        if hit is not None and hit[0] is parent:
            self._store.move_to_end(id(parent))
            self.hits += 1
            value = hit[1]
        else:
            self.misses += 1
            nbytes = parent.ids.numel() * self.decoder.config.hidden_size * 4
            if nbytes > self.budget:  # too large to keep: compute just these rows
                return self._frozen(batch.ids, batch.mask)
            value = self._frozen(parent.ids, parent.mask)
            while self._store and sum(v.numel() * v.element_size() for _, v in self._store.values()) + nbytes > self.budget:
                self._store.popitem(last=False)
            self._store[id(parent)] = (parent, value)  # the batch itself is kept: its id stays unique
        value = value if rows is None else value[rows.to(value.device)]
        return value[:, : batch.ids.shape[1]]

    def clear(self) -> None:
        self._store.clear()
        self.hits = self.misses = 0
