"""Learning curves across strategies: ``plots/curves_<metric>.png``, one panel per partition setting,
one line per strategy (the mean over seeds of each cell's per-round figure) with a band from the lowest
to the highest seed. Read from each finished cell's ``rounds.csv``; a strategy keeps its colour in
every panel (the order of the grid's strategies)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def _series(cell: Path, key: str) -> dict[int, float]:
    """{round: value} of ``key`` in a cell's rounds.csv (rounds without a finite value left out)."""
    try:
        with (cell / "rounds.csv").open() as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    out = {}
    for r in rows:
        try:
            v = float(r.get(key) or "nan")
        except ValueError:
            continue
        if math.isfinite(v):
            out[int(r["round"])] = v
    return out


def curves(rows: list[dict], key: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(partition, strategy) -> (rounds, mean, min, max over seeds) of ``key``, on the rounds every seed
    of that cell reached."""
    cells: dict[tuple[str, str], list[dict[int, float]]] = {}
    for r in rows:
        if r["status"] == "ok":
            s = _series(Path(r["output_dir"]), key)
            if s:
                cells.setdefault((r["partition"], r["strategy"]), []).append(s)
    out = {}
    for k, seeds in cells.items():
        common = sorted(set.intersection(*(set(s) for s in seeds)))
        if not common:
            continue
        m = np.array([[s[t] for t in common] for s in seeds])
        out[k] = (np.array(common), m.mean(0), m.min(0), m.max(0))
    return out


def plot_curves(rows: list[dict], out: Path) -> list[Path]:
    """curves_accuracy.png (test accuracy per round; next-token accuracy for LLM grids), plus
    curves_test_loss.png and, with a validation split, curves_val_accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpers.results.plotting import categorical

    ok = [r for r in rows if r["status"] == "ok"]
    parts = list(dict.fromkeys(r["partition"] for r in ok))
    strats = list(dict.fromkeys(r["strategy"] for r in ok))
    if not ok:
        return []
    colours = dict(zip(strats, categorical(len(strats))))
    llm = any(r.get("perplexity_mean") not in (None, "") for r in ok)
    written = []
    for key, label in (("accuracy_mean", "next-token accuracy" if llm else "personalized test accuracy"),
                       ("test_loss_mean", "test loss (mean NLL per reply token)" if llm else "test loss"),
                       ("val_accuracy_mean", "validation accuracy")):
        data = curves(ok, key)
        if not data:
            continue
        n = len(parts)
        fig, axes = plt.subplots(1, n, figsize=(min(18, 4.2 * n + 1.5), 3.6), squeeze=False, sharey=True)
        for ax, p in zip(axes[0], parts):
            for s in strats:
                if (p, s) not in data:
                    continue
                x, mean, lo, hi = data[(p, s)]
                ax.plot(x, mean, "-", marker="o", ms=2.5, lw=1.2, color=colours[s], label=s)
                ax.fill_between(x, lo, hi, color=colours[s], alpha=0.15, lw=0)
            ax.set_title(p, fontsize=9)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            from fedpers.results.plotting import integer_ticks

            integer_ticks(ax.xaxis)
        axes[0][0].set_ylabel(label)
        axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left", title="strategy", title_fontsize=8)
        fig.suptitle(f"{label} per round: mean over seeds, band from the lowest to the highest seed", fontsize=9)
        fig.tight_layout()
        path = out / f"curves_{key.removesuffix('_mean')}.png"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
