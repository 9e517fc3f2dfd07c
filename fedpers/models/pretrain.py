"""Rebuild the default backbone's weights: ``python -m fedpers.models.pretrain``.

Recipe (self-supervised, no labels), on the 449 digits images reserved as source data
(``fedpers.data.datasets.digits_source_images``), which no federated client ever holds: each image
gets a random 1-pixel shift and one of the 8 symmetries of the square; a quarter of its 2x2 patches
are blanked and Gaussian noise is added. From the [CLS] feature alone, a linear decoder reconstructs
the clean (shifted, transformed) image and a linear classifier names the symmetry
(loss = MSE + 0.1 * CE). AdamW (lr 1e-3, wd 0.05), 150 epochs, warm-up + cosine, batch 64, seed 0. Decoder and
classifier are dropped; the backbone is saved as safetensors (head-less, num_classes=0).

At the end it prints a linear-probe accuracy on the federated pool, as a diagnostic of the frozen
features only (the probe is not saved and nothing is fitted to client data).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedpers.data.datasets import digits_source_images, load_digits_federated
from fedpers.models.zoo import DIGITS_WEIGHTS


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply symmetry k in [0, 8) to each image of x (N, C, H, W)."""
    out = torch.empty_like(x)
    for t in range(8):
        m = k == t
        if m.any():
            y = torch.rot90(x[m], t % 4, dims=(2, 3))
            out[m] = torch.flip(y, dims=(3,)) if t >= 4 else y
    return out


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    padded = F.pad(x, (1, 1, 1, 1))
    n, _, h, w = x.shape
    dy = torch.randint(0, 3, (n,), generator=g)
    dx = torch.randint(0, 3, (n,), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def mask_patches(x: torch.Tensor, g: torch.Generator, patch: int = 2, ratio: float = 0.25) -> torch.Tensor:
    n, _, h, w = x.shape
    keep = (torch.rand(n, 1, h // patch, w // patch, generator=g) >= ratio).float()
    return x * keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)



def adamw_warmup_cosine(params, lr: float, total: int):
    """AdamW (weight decay 0.05) with 5% linear warm-up then cosine decay over ``total`` steps: the
    schedule both bundled backbones were pretrained with."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    return opt, sched

def pretrain(epochs: int = 150, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log_every: int = 50):
    import timm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(digits_source_images())
    model = timm.create_model("vit_fedpers_digits", pretrained=False, num_classes=0)
    decoder = torch.nn.Linear(model.embed_dim, images[0].numel())
    rotation = torch.nn.Linear(model.embed_dim, 8)
    params = [*model.parameters(), *decoder.parameters(), *rotation.parameters()]
    mean, std = 0.5, 0.5
    opt, sched = adamw_warmup_cosine(params, lr, epochs * math.ceil(len(images) / batch_size))
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        rec_sum = correct = seen = 0.0
        for i in range(0, len(images), batch_size):
            k = torch.randint(0, 8, (len(order[i : i + batch_size]),), generator=g)
            clean = dihedral(random_shift(images[order[i : i + batch_size]], g), k)
            x = mask_patches(clean, g) + 0.05 * torch.randn(clean.shape, generator=g)
            feats = model((x - mean) / std)
            rec = F.mse_loss(decoder(feats), clean.flatten(1))
            logits = rotation(feats)
            loss = rec + 0.1 * F.cross_entropy(logits, k)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            rec_sum += rec.item() * len(k)
            correct += int((logits.argmax(1) == k).sum())
            seen += len(k)
        if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}/{epochs} reconstruction mse {rec_sum / seen:.4f} "
                  f"symmetry acc {correct / seen:.3f} ({time.time() - t0:.0f}s)")
    return model.eval()


def linear_probe(model) -> float:
    from sklearn.linear_model import LogisticRegression

    ds = load_digits_federated().with_format("numpy")
    x = torch.from_numpy(np.asarray(ds["image"], dtype=np.float32))
    y = np.asarray(ds["label"])
    with torch.no_grad():
        feats = model((x - 0.5) / 0.5).numpy()
    n = len(y) // 2
    clf = LogisticRegression(max_iter=2000).fit(feats[:n], y[:n])
    return float(clf.score(feats[n:], y[n:]))


def save_and_report(model, out: Path, probe, backbone: str, what: str, t0: float | None = None) -> None:
    """Save the trained backbone as safetensors, then print ``probe`` (a linear probe of frozen features)
    on it and on a randomly initialised ``backbone`` of the same shape: the recipes' shared last steps."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    took = f" after {time.time() - t0:.0f}s" if t0 is not None else ""
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB){took}")
    print(f"linear probe of frozen features on {what}: {probe(model):.3f}")
    rand = __import__("timm").create_model(backbone, pretrained=False, num_classes=0).eval()
    print(f"same probe on a randomly initialised backbone: {probe(rand):.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = pretrain(epochs=args.epochs, seed=args.seed)
    save_and_report(model, args.out, linear_probe, "vit_fedpers_digits", "the federated pool (diagnostic)")


if __name__ == "__main__":
    main()
