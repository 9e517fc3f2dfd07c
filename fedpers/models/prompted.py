"""Frozen timm ViT with shallow visual prompts: tokens ``[prefix (cls...), P, patch_1..patch_M]``.

The backbone is created once per process and shared by every client that process simulates; its
parameters never require grad and it always runs in eval mode (no dropout), so only the prompts (and
the client's head) learn.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

import fedpers.models.zoo  # noqa: F401  (registers fedpers' own timm models)


class BackboneError(ValueError):
    pass


class PromptedViT(nn.Module):
    modality = "vision"

    def __init__(self, vit: nn.Module):
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens", "embed_dim"):
            if not hasattr(vit, attr):
                raise BackboneError(
                    f"model.backbone: {type(vit).__name__} is not a timm VisionTransformer (no {attr!r})"
                )
        self.vit = vit.eval()
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.embed_dim = int(vit.embed_dim)
        self.num_prefix = int(vit.num_prefix_tokens)
        cfg = getattr(vit, "pretrained_cfg", {}) or {}
        in_size = cfg.get("input_size") or (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
        self.in_chans = int(vit.patch_embed.proj.in_channels)
        self.img_size = tuple(vit.patch_embed.img_size) if vit.patch_embed.img_size else tuple(in_size[1:])
        mean = cfg.get("mean") or (0.5,) * self.in_chans
        std = cfg.get("std") or (0.5,) * self.in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # the frozen backbone never leaves eval mode
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> normalised input of the backbone's channels and size."""
        x = images
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            else:
                raise BackboneError(f"images have {x.shape[1]} channels, backbone expects {self.in_chans}")
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (with prefix tokens). Independent of the prompts."""
        with torch.no_grad():
            return self.vit._pos_embed(self.vit.patch_embed(x))

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def features(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (from :meth:`embed`) + prompts -> pooled features (N, D).

        ``prompts`` is (K, D) for shallow VPT, or (depth, K, D) for VPT-deep: block i then sees
        ``prompts[i]`` in place of whatever the prompt positions held after block i-1."""
        deep = prompts.dim() == 3
        if deep and prompts.shape[0] != self.depth:
            raise BackboneError(f"deep prompts have {prompts.shape[0]} layers, backbone has {self.depth} blocks")
        n = tokens.shape[0]
        first = prompts[0] if deep else prompts
        num_p = first.shape[0]
        k = self.num_prefix
        x = torch.cat([tokens[:, :k], first.unsqueeze(0).expand(n, -1, -1), tokens[:, k:]], dim=1)
        vit = self.vit
        x = vit.norm_pre(x)
        if deep:
            for i, block in enumerate(vit.blocks):
                if i > 0:
                    p = prompts[i].unsqueeze(0).expand(n, -1, -1)
                    x = torch.cat([x[:, :k], p, x[:, k + num_p :]], dim=1)
                x = block(x)
        else:
            x = vit.blocks(x)
        x = vit.norm(x)
        # Pool as the backbone would, but never over the prompt tokens.
        x = torch.cat([x[:, :k], x[:, k + num_p :]], dim=1)
        return vit.forward_head(x, pre_logits=True)

    def features_with(self, tokens: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The adapted-backbone interface (see fedpers.models.backbones): prompts by name, deep
        prompts (depth, K, D) when the client trains them."""
        return self.features(tokens, tensors["deep_prompts"] if "deep_prompts" in tensors else tensors["prompts"])

    def features_per_row(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Shallow prompts, one set per row: prompts (N, K, D). Clients with different prompts then share
        one forward/backward pass (``fedpers.rounds.batched``); per row it is :meth:`features` (K, D)."""
        k, vit = self.num_prefix, self.vit
        x = vit.norm_pre(torch.cat([tokens[:, :k], prompts, tokens[:, k:]], dim=1))
        x = vit.norm(vit.blocks(x))
        x = torch.cat([x[:, :k], x[:, k + prompts.shape[1] :]], dim=1)  # never pool over prompt tokens
        return vit.forward_head(x, pre_logits=True)

    def forward(self, images: torch.Tensor, prompts: torch.Tensor, *, prepared: bool = False) -> torch.Tensor:
        """Images -> features. ``prepared=True`` takes normalised inputs and runs the patch embedding
        with grad, so ``torch.func.functional_call`` can train backbone weights (``fedavg_full``)."""
        if prepared:
            return self.features(self.vit._pos_embed(self.vit.patch_embed(images)), prompts)
        return self.features(self.embed(self.prepare(images)), prompts)


def create_vit(backbone: str, pretrained: bool, checkpoint: str | None, img_size: int | None = None) -> nn.Module:
    import timm

    if not timm.is_model(backbone):
        raise BackboneError(f"model.backbone: {backbone!r} is not a timm model name (see timm.list_models('vit*'))")
    # timm resamples pretrained position embeddings when img_size differs from the weights' size.
    extra = {"img_size": img_size} if img_size is not None else {}
    try:
        return timm.create_model(
            backbone,
            pretrained=pretrained and checkpoint is None,
            checkpoint_path=checkpoint,
            num_classes=0,
            **extra,
        )
    except (RuntimeError, OSError) as e:
        hint = " (no internet? use model.checkpoint=PATH for local weights)" if pretrained and checkpoint is None else ""
        raise BackboneError(f"model.backbone: could not create {backbone!r}{hint}: {e}") from e


@functools.lru_cache(maxsize=2)
def load_backbone(backbone: str, pretrained: bool, checkpoint: str | None, img_size: int | None = None) -> PromptedViT:
    """One frozen backbone per process and (name, weights, input size)."""
    return PromptedViT(create_vit(backbone, pretrained, checkpoint, img_size))


def backbone_from_config(m) -> PromptedViT:
    """The frozen backbone a ``ModelConfig`` describes."""
    return load_backbone(m.backbone, m.pretrained, m.checkpoint, m.img_size)


@functools.lru_cache(maxsize=8)
def _meta_vit_dims(backbone: str) -> tuple[int, int]:
    import timm

    if not timm.is_model(backbone):
        raise BackboneError(f"model.backbone: {backbone!r} is not a timm model name (see timm.list_models('vit*'))")
    with torch.device("meta"):
        vit = timm.create_model(backbone, pretrained=False, num_classes=0)
    return int(vit.embed_dim), len(getattr(vit, "blocks", ()))


def backbone_embed_dim(backbone: str) -> int:
    """Token width, without loading weights (the server needs only the prompt shape)."""
    return _meta_vit_dims(backbone)[0]


def backbone_depth(backbone: str) -> int:
    """Number of transformer blocks (layers of deep prompts), without loading weights."""
    return _meta_vit_dims(backbone)[1]
