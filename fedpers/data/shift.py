"""Feature (domain) shift and concept shift, applied per client on top of any label-skew partition.

Clients are put in groups (``data.shift.num_groups``; 0 = one group per client). Every group gets its own
domain (a composition of image transforms with random magnitudes) or its own concept (a label map). All
randomness comes from generators seeded by (seed, group) for parameters and (seed, partition-id) for
per-sample noise, so a client's data is identical in every process and engine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedpers.data.config import ShiftConfig

TRANSFORMS = ("rotate", "contrast", "color", "blur", "noise", "invert")
_DOMAIN_TAG, _CONCEPT_TAG, _NOISE_TAG = 0xD0, 0xC0, 0x40


def group_of(pid: int, num_groups: int) -> int:
    return pid if num_groups == 0 else pid % num_groups


def domain_params(shift: ShiftConfig, seed: int, group: int, channels: int, image_size: int) -> dict:
    """The domain of one group: each listed transform with its magnitude (JSON-friendly)."""
    rng = np.random.default_rng([seed, group, _DOMAIN_TAG])
    # Draw every magnitude whether or not its transform is listed, so that adding or removing one
    # transform does not change the others'.
    u = rng.uniform(-1.0, 1.0, size=4)
    blur_u, noise_u, invert_u = rng.uniform(size=3)
    gains = rng.uniform(-1.0, 1.0, size=3)
    s = shift.strength
    full = {
        "rotate": float(180.0 * s * u[0]),  # degrees
        "contrast": float(math.exp(s * math.log(2.0) * u[1])),  # in [1/2, 2] at strength 1
        "color": ([float(1.0 + 0.5 * s * g) for g in gains] if channels == 3  # per-channel gains
                  else float(math.exp(s * math.log(2.0) * u[2]))),  # grayscale: gamma in [1/2, 2]
        # Gaussian sigma in pixels, larger on larger images so it blurs the same share of the picture
        "blur": float(s * (0.2 + 0.6 * blur_u) * max(1.0, image_size / 16)),
        "noise": float(s * (0.02 + 0.1 * noise_u)),  # std of additive Gaussian noise
        "invert": bool(s > 0 and invert_u < 0.5),
    }
    return {t: full[t] for t in TRANSFORMS if t in shift.transforms}


def apply_domain(x: torch.Tensor, params: dict, seed: int, pid: int, split: int) -> torch.Tensor:
    """Apply a domain to a batch of (N, C, H, W) images in [0, 1]; ``split`` separates train/test noise."""
    import torchvision.transforms.v2.functional as TF

    if x.shape[0] == 0:
        return x
    x = x.clone()
    if params.get("rotate"):
        x = TF.rotate(x, params["rotate"], interpolation=TF.InterpolationMode.BILINEAR)
    if params.get("blur", 0) > 0:
        sigma = params["blur"]
        k = 2 * math.ceil(2 * sigma) + 1
        x = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    if "contrast" in params:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + params["contrast"] * (x - mean)
    if "color" in params:
        x = x.clamp(0, 1)
        c = params["color"]
        x = x * torch.tensor(c, dtype=x.dtype).view(1, -1, 1, 1) if isinstance(c, list) else x.pow(c)
    if params.get("invert"):
        x = 1.0 - x.clamp(0, 1)
    if params.get("noise", 0) > 0:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, pid, split, _NOISE_TAG]).generate_state(1)[0]))
        x = x + params["noise"] * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x.clamp(0, 1)


def label_map(shift: ShiftConfig, seed: int, group: int, num_classes: int) -> np.ndarray:
    """The concept of one group: ``new_label = map[old_label]``.

    A permutation hurts any model whose head is shared, but a client whose head is private and starts at
    zero trains exactly as without it (the loss is symmetric in the head's rows): measured results of
    permute and no shift coincide for such strategies. Grouping merges different classes on different
    clients, which changes what each client's features must separate.
    """
    rng = np.random.default_rng([seed, group, _CONCEPT_TAG])
    order = rng.permutation(num_classes)
    if shift.concept_mode == "permute":
        return order.astype(np.int64)
    # group: shuffled classes cut into num_label_groups near-equal blocks; block index is the new label
    out = np.empty(num_classes, dtype=np.int64)
    for label, block in enumerate(np.array_split(order, shift.num_label_groups)):
        out[block] = label
    return out


def apply_shift(shift: ShiftConfig, seed: int, pid: int, num_classes: int,
                xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Shift one client's splits (train, test, ...). Returns new images, labels and a description."""
    if shift.name == "none":
        return xs, ys, {}
    group = group_of(pid, shift.num_groups)
    if shift.name == "domain":
        params = domain_params(shift, seed, group, int(xs[0].shape[1]), int(xs[0].shape[-1]))
        xs = [apply_domain(x, params, seed, pid, split) for split, x in enumerate(xs)]
        return xs, ys, {"group": group, "domain": params}
    mapping = label_map(shift, seed, group, num_classes)
    m = torch.from_numpy(mapping)
    return xs, [m[y] for y in ys], {"group": group, "label_map": mapping.tolist()}
