"""Rebuild the fonts backbone's weights: ``python -m fedpers.models.pretrain_fonts``.

Recipe: ``vit_fedpers_fonts`` (32x32 RGB, patch 8, dim 128, depth 6) trained with labels on the
SYNTHETIC-RENDERED *letters* (A-Z, a-z: 52 classes, 31,200 images, ``fedpers.data.fonts
.font_letters_source``). The federated ``fonts`` dataset holds only the *digits*, rendered with another
seed: no federated image and no federated class is ever seen in pretraining. Each batch gets a random
shift of up to 2 pixels (reflect padding) and Gaussian pixel noise (std 0.03) on top of the rendering's own
augmentation. Cross-entropy with label smoothing 0.1 through a linear head on the [CLS] feature; AdamW
(lr 1e-3, wd 0.05), batch 128, 5% warm-up + cosine, seed 0, one CPU thread (so the rebuild is
bit-identical on a given torch build). The head is dropped; the backbone is saved as safetensors
(head-less, num_classes=0).

At the end it prints a linear-probe accuracy of the frozen features on the federated digits, against the
same probe on a randomly initialised backbone of the same shape: a diagnostic only (nothing fitted to
the federated data is saved).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedpers.data.fonts import LETTERS, font_digits, font_letters_source, to_float
from fedpers.models.pretrain import adamw_warmup_cosine, save_and_report
from fedpers.models.zoo import FONTS_WEIGHTS

MEAN, STD = 0.5, 0.5


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def pretrain(epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, log_every: int = 1):
    import timm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    src = font_letters_source()
    images = torch.from_numpy(src["image"])  # uint8: converted per batch, a quarter of the memory
    labels = torch.from_numpy(src["label"])
    model = timm.create_model("vit_fedpers_fonts", pretrained=False, num_classes=0)
    head = torch.nn.Linear(model.embed_dim, len(LETTERS))
    params = [*model.parameters(), *head.parameters()]
    opt, sched = adamw_warmup_cosine(params, lr, epochs * math.ceil(len(images) / batch_size))
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        loss_sum = correct = seen = 0.0
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            x = random_shift(images[idx].float() / 255.0, g)
            x = x + 0.03 * torch.randn(x.shape, generator=g)
            logits = head(model((x - MEAN) / STD))
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += len(idx)
        if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.4f} letter acc {correct / seen:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


@torch.no_grad()
def features(model, images: np.ndarray, chunk: int = 1024) -> np.ndarray:
    out = [model((torch.from_numpy(to_float(images[i : i + chunk])) - MEAN) / STD).numpy()
           for i in range(0, len(images), chunk)]
    return np.concatenate(out)


def linear_probe(model, max_images: int = 10_000, seed: int = 0) -> float:
    """Logistic regression on frozen features of the federated digits: fit on half of a random
    ``max_images`` subset, score on the other half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    d = font_digits()
    idx = np.random.default_rng(seed).permutation(len(d["label"]))[:max_images]
    f, y = features(model, d["image"][idx]), d["label"][idx]
    n = len(y) // 2
    scaler = StandardScaler().fit(f[:n])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(f[:n]), y[:n])
    return float(clf.score(scaler.transform(f[n:]), y[n:]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=FONTS_WEIGHTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the reduction order, hence every bit of the weights, is fixed
    t0 = time.time()
    model = pretrain(epochs=args.epochs, seed=args.seed)
    save_and_report(model, args.out, linear_probe, "vit_fedpers_fonts", "the federated digits", t0)


if __name__ == "__main__":
    main()
