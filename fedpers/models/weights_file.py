"""``model.checkpoint``, read before any work: a file timm could not load into the backbone is refused
with its name and what is wrong with it, instead of a traceback after the data is built.

The checks follow what ``timm.create_model(name, checkpoint_path=PATH, num_classes=0)`` does with the
file (``timm.models._helpers.load_checkpoint``): ``.npz``/``.npy`` go to the ViT's ``load_pretrained``,
which opens a NumPy archive and needs one of the big_vision layout anchors (``embedding/kernel``, with or
without the ``opt/target/``, ``params/`` and ``params/img/`` prefixes; ``vision_transformer._load_weights``);
``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``, taking
the ``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model`` entry when there is one and dropping
``module.``/``_orig_mod.`` prefixes, then loaded *strictly*: every name the backbone has, no other, each
with the backbone's shape. Only headers and shapes are read (safetensors header, a memory-mapped torch
file); the backbone is built on the meta device, so nothing is allocated.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

NPZ_ANCHORS = tuple(p + "embedding/kernel" for p in ("", "opt/target/", "params/", "params/img/"))
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's load_state_dict, in its order
_PREFIXES = ("_orig_mod.", "module.")


def check_weights_file(m) -> None:
    """Raise ConfigError naming ``model.checkpoint`` when ``m.checkpoint`` cannot be the backbone's weights."""
    from fedpers.config import ConfigError

    if m.checkpoint is None or m.modality != "vision":
        return
    path = Path(m.checkpoint)
    problem = weights_problem(path, m.backbone, m.img_size)
    if problem:
        raise ConfigError("model.checkpoint", f"{path}: {problem}")


def weights_problem(path: Path, backbone: str, img_size: int | None = None) -> str:
    """What makes ``path`` unusable as ``backbone``'s weights, or "" when timm would load it."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return (
            "a .npy file holds one array, not a set of named weights (use a big_vision .npz, a "
            ".safetensors file or a torch state dict)"
        )
    if suffix == ".npz":
        return _npz_problem(path)
    shapes = _safetensors_shapes(path) if suffix == ".safetensors" else _torch_shapes(path)
    if isinstance(shapes, str):
        return shapes
    want = _backbone_shapes(backbone, img_size)
    return "" if want is None else _mismatch(shapes, want, backbone)


def _npz_problem(path: Path) -> str:
    import numpy as np

    if not zipfile.is_zipfile(path):
        return "not a .npz archive (not a zip file)"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                return "not a .npz archive (a single array)"
            if not any(k in archive.files for k in NPZ_ANCHORS):
                return f"not a ViT weights archive in the big_vision layout (none of {', '.join(NPZ_ANCHORS)})"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        return f"not a readable .npz archive ({type(e).__name__}: {e})"
    except AttributeError:  # np.load returned a bare array, which has no context manager
        return "not a .npz archive (a single array)"
    return ""


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]] | str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError...: the header does not parse
        return f"not a safetensors file ({type(e).__name__}: {e})"


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]] | str:
    import torch

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(2) != b"\x80\x02":  # torch.save's legacy format starts with a protocol-2 pickle
                return "not a torch weights file (neither torch.save's zip archive nor its legacy format)"
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        return f"cannot be loaded safely (it needs the general unpickler, which can run code): {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - truncated, random bytes, not a torch file
        return f"not a torch weights file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if isinstance(obj, dict):
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        obj = obj[key] if key else obj
    if not isinstance(obj, dict) or not obj:
        return f"holds a {type(obj).__name__}, not a mapping of weight names to tensors (a state dict)"
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        return f"entries that are not tensors: {', '.join(not_tensors[:3])}"
    return {_clean(str(k)): tuple(v.shape) for k, v in obj.items()}


def _clean(name: str) -> str:
    for p in _PREFIXES:
        name = name.removeprefix(p)
    return name


def _backbone_shapes(backbone: str, img_size: int | None) -> dict[str, tuple[int, ...]] | None:
    import timm
    import torch

    import fedpers.models.zoo  # noqa: F401  (registers fedpers' own timm models)

    if not timm.is_model(backbone):
        return None  # named as such by the backbone check
    extra = {"img_size": img_size} if img_size is not None else {}
    with torch.device("meta"):
        vit = timm.create_model(backbone, pretrained=False, num_classes=0, **extra)
    return {k: tuple(v.shape) for k, v in vit.state_dict().items()}


def _mismatch(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], backbone: str) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k} {got[k]} (the backbone's is {want[k]})" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights of {backbone} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} names {backbone} does not have (e.g. {', '.join(extra[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ: {'; '.join(shapes[:3])}")
    return ("not weights of " + backbone + ": " + "; ".join(parts)) if parts else ""
