"""The adapted-backbone seam: one frozen model per process, selected by ``model.modality``.

Both implementations offer the same interface to the client:

- ``prepare(x)``: raw client inputs (images / strings) -> model inputs (cached where it pays);
- ``embed(x)``: adapter-independent precomputation (ViT patch embeddings; identity for text);
- ``features_with(batch, tensors)``: pooled (N, embed_dim) features under the client's adapter tensors;
- ``embed_dim``: width of the pooled features (the linear head's input).

``adapter_shapes`` gives the adapter tensors by name (``prompts`` for visual/soft prompts and prefixes,
peft's LoRA keys for LoRA); the server needs only these shapes.
"""

from __future__ import annotations

from torch import nn


def load_model(m) -> nn.Module:
    if m.modality == "llm":
        from fedpers.models.llm import llm_model_from_config

        return llm_model_from_config(m)
    if m.modality == "text":
        from fedpers.models.text import text_model_from_config

        return text_model_from_config(m)
    from fedpers.models.prompted import backbone_from_config

    return backbone_from_config(m)


def feature_dim(m) -> int:
    if m.modality in ("text", "llm"):
        return load_model(m).embed_dim
    from fedpers.models.prompted import backbone_embed_dim

    return backbone_embed_dim(m.backbone)


def adapter_shapes(m, dim: int) -> dict[str, tuple[int, ...]]:
    if m.modality in ("text", "llm"):
        return load_model(m).tensor_shapes()
    return {"prompts": (m.num_prompts, dim)}
