"""Statistics of a sweep: per-cell means with 95% bootstrap CIs, paired differences to a reference method.

The unit of a benchmark cell (partition setting x strategy) is a client's personalized test accuracy in
one seed. Seeds are independent federations (partition, initialisation, sampling); clients within a seed
share one training run. The bootstrap is therefore hierarchical: resample seeds with replacement, then
clients with replacement within each drawn seed, and average the per-seed statistic over the drawn seeds
(every seed weighs the same, whatever its client count). The 95% CI is the 2.5-97.5 percentile interval.

Paired differences to the reference (default ``pfedpg``) use the same seed and the same client, so
partition and sampling noise cancel: ``d = acc(strategy) - acc(reference)`` per (seed, client) present in
both, bootstrapped the same way. A difference whose CI excludes 0 is marked in ``table.md``.

worst-10% is the mean of the lowest ``ceil(0.1 n)`` clients of a seed; with fewer than
``MIN_WORST_CLIENTS`` clients in that tail it is flagged, since it is then one or two clients' luck.

Cells are read from each row's ``output_dir``/summary.json (``final.per_client``, ``unseen.per_client``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

BOOTSTRAP = 2000
LEVEL = 0.95
MIN_WORST_CLIENTS = 5
REFERENCE = "pfedpg"
_SEED = 0  # the bootstrap's own seed: the same runs give the same table


def worst10(x: np.ndarray) -> np.ndarray:
    """Mean of the lowest ceil(10%) along the last axis."""
    k = max(1, math.ceil(0.1 * x.shape[-1]))
    return np.sort(x, axis=-1)[..., :k].mean(-1)


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(-1)


def hier_bootstrap(groups: list[np.ndarray], stat: Callable[[np.ndarray], np.ndarray] = _mean,
                   n_boot: int = BOOTSTRAP, seed: int = _SEED) -> tuple[float, float, float]:
    """(estimate, low, high): ``stat`` per group (seed) averaged over groups, and its percentile CI under
    resampling groups, then members within each drawn group."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan, math.nan
    est = float(np.mean([stat(g) for g in groups]))
    rng = np.random.default_rng(seed)
    s = len(groups)
    drawn = rng.integers(0, s, size=(n_boot, s))
    per_slot = np.empty((n_boot, s))
    for gi, g in enumerate(groups):
        rows = drawn == gi
        k = int(rows.sum())
        if k:
            per_slot[rows] = stat(g[rng.integers(0, len(g), size=(k, len(g)))])
    boot = per_slot.mean(1)
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return est, float(lo), float(hi)


def per_client(row: dict, key: str = "final") -> dict[str, float]:
    """{client id: accuracy} of one finished cell (``final`` = trained clients, ``unseen`` = held out)."""
    s = json.loads((Path(row["output_dir"]) / "summary.json").read_text())
    block = s.get(key) or {}
    return {str(k): float(v) for k, v in (block.get("per_client") or {}).items()}


def collect(rows: list[dict], key: str = "final") -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(partition, strategy): {seed: {client: accuracy}}} over the finished rows."""
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        try:
            acc = per_client(r, key)
        except (OSError, ValueError, KeyError):
            continue
        if acc:
            out.setdefault((r["partition"], r["strategy"]), {})[int(r["seed"])] = acc
    return out


def cell_stats(by_seed: dict[int, dict[str, float]]) -> dict:
    groups = [np.array(list(v.values())) for _, v in sorted(by_seed.items())]
    n_clients = min(len(g) for g in groups)
    return {"mean": hier_bootstrap(groups), "worst10": hier_bootstrap(groups, worst10),
            "seeds": len(groups), "clients": n_clients, "worst_k": max(1, math.ceil(0.1 * n_clients))}


def paired(by_seed: dict[int, dict[str, float]], ref: dict[int, dict[str, float]]) -> dict | None:
    """Strategy minus reference on the (seed, client) pairs both have; None when they share none."""
    groups = []
    for seed in sorted(set(by_seed) & set(ref)):
        common = sorted(set(by_seed[seed]) & set(ref[seed]))
        if common:
            groups.append(np.array([by_seed[seed][c] - ref[seed][c] for c in common]))
    if not groups:
        return None
    est, lo, hi = hier_bootstrap(groups)
    return {"diff": (est, lo, hi), "seeds": len(groups), "pairs": int(sum(len(g) for g in groups)),
            "significant": bool(lo > 0 or hi < 0)}


def _ci(t: tuple[float, float, float], signed: bool = False) -> str:
    est, lo, hi = (100 * v for v in t)
    if math.isnan(est):
        return "–"
    f = "+.1f" if signed else ".1f"
    return f"{est:{f}} [{lo:{f}}, {hi:{f}}]"


def sections(rows: list[dict], reference: str = REFERENCE) -> list[str]:
    """Markdown sections for table.md: mean and worst-10% with 95% CIs, and paired differences."""
    cells = collect(rows)
    if not cells:
        return []
    parts = list(dict.fromkeys(p for p, _ in cells))
    strats = list(dict.fromkeys(s for _, s in cells))
    stats = {k: cell_stats(v) for k, v in cells.items()}
    unseen = {k: cell_stats(v) for k, v in collect(rows, "unseen").items()}
    lines = ["## Mean and worst-10% with 95% bootstrap CIs (%)", "",
             (f"Each entry: estimate [95% CI], hierarchical bootstrap ({BOOTSTRAP} draws) over seeds, then clients "
              "within a seed; clients are the trained ones (unseen: the held-out ones). worst-10% is the mean of "
              f"the lowest ceil(10%) clients per seed; † marks tails of fewer than {MIN_WORST_CLIENTS} clients."), ""]
    for p in parts:
        lines += [f"### {p}", "", "| strategy | seeds | clients | accuracy | worst-10% | unseen |",
                  "|---|---|---|---|---|---|"]
        for s in strats:
            st = stats.get((p, s))
            if st is None:
                continue
            dag = "" if st["worst_k"] >= MIN_WORST_CLIENTS else " †"
            un = unseen.get((p, s))
            lines.append(f"| {s} | {st['seeds']} | {st['clients']} | {_ci(st['mean'])} | "
                         f"{_ci(st['worst10'])}{dag} | {_ci(un['mean']) if un else '–'} |")
        lines.append("")
    if not any(s == reference for _, s in cells):
        return lines + [f"No paired differences: the grid has no strategy labelled {reference!r}.", ""]
    if all(s == reference for s in strats):
        return lines
    lines += [f"## Paired difference to {reference} (percentage points)", "",
              (f"strategy − {reference} on the same seeds, partitions and clients: estimate [95% CI]. "
               "**Bold** with * = the CI excludes 0."), "",
              "| strategy | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for s in strats:
        if s == reference:
            continue
        cols = []
        for p in parts:
            d = paired(cells[(p, s)], cells[(p, reference)]) if (p, s) in cells and (p, reference) in cells else None
            text = "–" if d is None else _ci(d["diff"], signed=True)
            cols.append(f"**{text}** *" if d is not None and d["significant"] else text)
        lines.append(f"| {s} | " + " | ".join(cols) + " |")
    return lines + [""]


def plot(rows: list[dict], out: Path, reference: str = REFERENCE) -> None:
    """plots/accuracy_ci.png (means with 95% CI error bars) and plots/paired_diff.png (forest plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = collect(rows)
    if not cells:
        return
    out.mkdir(parents=True, exist_ok=True)
    parts = list(dict.fromkeys(p for p, _ in cells))
    strats = list(dict.fromkeys(s for _, s in cells))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(strats) * len(parts)), 4))
    width = 0.8 / len(parts)
    for j, p in enumerate(parts):
        est = np.full(len(strats), np.nan)
        err = np.zeros((2, len(strats)))
        for i, s in enumerate(strats):
            if (p, s) in cells:
                e, lo, hi = cell_stats(cells[(p, s)])["mean"]
                est[i], err[:, i] = e, (e - lo, hi - e)
        ax.bar(np.arange(len(strats)) + j * width, est, width, yerr=err, label=p, capsize=2)
    ax.set_xticks(np.arange(len(strats)) + 0.4 - width / 2, strats, rotation=45, ha="right")
    ax.set_ylabel("personalized accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_ci.png", dpi=120)
    plt.close(fig)

    others = [s for s in strats if s != reference]
    if not others or not any(s == reference for _, s in cells):
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(3 * len(parts), 0.35 * len(others) + 1.5), sharey=True,
                             squeeze=False)
    for ax, p in zip(axes[0], parts):
        for i, s in enumerate(others):
            d = paired(cells[(p, s)], cells[(p, reference)]) if (p, s) in cells and (p, reference) in cells else None
            if d is None:
                continue
            e, lo, hi = (100 * v for v in d["diff"])
            ax.errorbar(e, i, xerr=[[e - lo], [hi - e]], fmt="o", color="C3" if d["significant"] else "C0",
                        capsize=2)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel(f"− {reference} (pp)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(others)), others)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "paired_diff.png", dpi=120)
    plt.close(fig)
