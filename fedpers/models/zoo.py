"""fedpers' own timm models: tiny ViTs for 8x8 digits and 32x32 rendered fonts, registered with timm
like any other ViT.

``timm.create_model("vit_fedpers_digits", pretrained=True)`` loads the weights file shipped in
``fedpers/models/weights/``; it was made by ``python -m fedpers.models.pretrain`` (self-supervised
pretraining on unlabelled source images disjoint from every client's data; see that module).
``vit_fedpers_fonts`` likewise, made by ``python -m fedpers.models.pretrain_fonts``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _bundled(name: str) -> Path:
    """The shipped weights file. Under ``flwr run`` this module is imported from the app bundle (FAB),
    which carries only source files, so fall back to the installed fedpers package's copy."""
    here = WEIGHTS_DIR / name
    if here.is_file():
        return here
    roots = [Path(p) for p in sys.path if p]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        url = json.loads(distribution("fedpers").read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):  # editable install: the source checkout
            roots.append(Path(url.removeprefix("file://")))
    except (PackageNotFoundError, ValueError):
        pass
    for root in roots:
        cand = root / "fedpers" / "models" / "weights" / name
        if cand.is_file():
            return cand
    return here  # missing everywhere: timm reports this path


DIGITS_WEIGHTS = _bundled("vit_fedpers_digits.safetensors")

FONTS_WEIGHTS = _bundled("vit_fedpers_fonts.safetensors")

DIGITS_ARCH = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)

# 32x32 RGB with patch 8: the same 16 patch tokens and width as the digits ViT, so a client's sample
# costs about the same (the fonts benchmark is sized by that cost).
FONTS_ARCH = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)

default_cfgs = generate_default_cfgs(
    {
        "vit_fedpers_fonts.letters_sup": {
            "file": str(FONTS_WEIGHTS),
            "num_classes": 0,
            "input_size": (3, 32, 32),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "crop_pct": 1.0,
            "license": "apache-2.0",
        },
        "vit_fedpers_digits.d8_rotation": {
            "file": str(DIGITS_WEIGHTS),
            "num_classes": 0,
            "input_size": (1, 8, 8),
            "mean": (0.5,),
            "std": (0.5,),
            "crop_pct": 1.0,
            "license": "apache-2.0",
        }
    }
)


@register_model
def vit_fedpers_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 8x8 grayscale images: patch 2 (16 patches), dim 128, depth 6, 4 heads."""
    args = dict(DIGITS_ARCH, **kwargs)
    return build_model_with_cfg(
        VisionTransformer,
        "vit_fedpers_digits",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **args,
    )


@register_model
def vit_fedpers_fonts(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 RGB images: patch 8 (16 patches), dim 128, depth 6, 4 heads. Pretrained weights:
    supervised on the SYNTHETIC-RENDERED letters (``python -m fedpers.models.pretrain_fonts``), disjoint
    from the federated ``fonts`` digits."""
    args = dict(FONTS_ARCH, **kwargs)
    return build_model_with_cfg(
        VisionTransformer,
        "vit_fedpers_fonts",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **args,
    )
