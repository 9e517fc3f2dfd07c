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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOOTSTRAP = 2000
LEVEL = 0.95
MIN_WORST_CLIENTS = 5
REFERENCE = "pfedpg"
_SEED = 0  # the bootstrap's own seed: the same runs give the same table


@dataclass(frozen=True)
class Metric:
    """A per-client figure of a cell: where its values sit in summary.json and which way is better."""

    name: str  # file-name part and table key
    title: str  # what a reader sees
    field: str  # the per-client mapping in summary.json's final / unseen block
    scale: float  # shown as value * scale (100: percent)
    unit: str  # after the numbers in headings: "%", "pp" for differences, or "" (perplexity)
    higher_is_better: bool
    transform: Callable[[float], float] = float
    digits: int = 1  # decimals shown

    def worst10(self, x: np.ndarray) -> np.ndarray:
        """Mean of the worst ceil(10%) clients along the last axis: the lowest accuracies, the highest
        perplexities."""
        return worst10(x) if self.higher_is_better else -worst10(-x)


ACCURACY = Metric("accuracy", "personalized accuracy", "per_client", 100.0, "%", True)
# LLM cells: the per-client accuracy is next-token accuracy on the reply tokens, and each client's
# token-weighted perplexity is exp of its mean NLL per reply token (summary.json's per_client_loss).
NEXT_TOKEN = Metric("accuracy", "next-token accuracy", "per_client", 100.0, "%", True)
PERPLEXITY = Metric("perplexity", "perplexity", "per_client_loss", 1.0, "", False, math.exp)
# The same losses on the log scale: each client's mean NLL per reply token (nats), averaged over clients (exp
# of it is the geometric mean of the clients' perplexities). A speaker whose adapter diverged adds a few nats
# here, not thousands of perplexity points, so this mean and its paired differences speak for the typical
# speaker where the perplexity mean is carried by one.
NLL = Metric("nll", "reply NLL (nats per token)", "per_client_loss", 1.0, "", False, digits=3)


def metrics_of(rows: list[dict]) -> list[Metric]:
    """The metrics a grid reports: perplexity and next-token accuracy when its cells are LLM runs (their
    summaries carry per-client losses), personalized accuracy otherwise."""
    for r in rows:
        if r.get("status") != "ok":
            continue
        try:
            final = json.loads((Path(r["output_dir"]) / "summary.json").read_text()).get("final") or {}
        except (OSError, ValueError, KeyError):
            continue
        return [PERPLEXITY, NLL, NEXT_TOKEN] if "per_client_loss" in final else [ACCURACY]
    return [ACCURACY]


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


def per_client(row: dict, key: str = "final", metric: Metric = ACCURACY) -> dict[str, float]:
    """{client id: metric} of one finished cell (``final`` = trained clients, ``unseen`` = held out)."""
    s = json.loads((Path(row["output_dir"]) / "summary.json").read_text())
    block = s.get(key) or {}
    return {str(k): metric.transform(float(v)) for k, v in (block.get(metric.field) or {}).items()
            if v is not None and math.isfinite(float(v))}


def collect(rows: list[dict], key: str = "final",
            metric: Metric = ACCURACY) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(partition, strategy): {seed: {client: metric}}} over the finished rows."""
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        try:
            acc = per_client(r, key, metric)
        except (OSError, ValueError, KeyError):
            continue
        if acc:
            out.setdefault((r["partition"], r["strategy"]), {})[int(r["seed"])] = acc
    return out


def cell_stats(by_seed: dict[int, dict[str, float]], metric: Metric = ACCURACY) -> dict:
    groups = [np.array(list(v.values())) for _, v in sorted(by_seed.items())]
    n_clients = min(len(g) for g in groups)
    return {"mean": hier_bootstrap(groups), "worst10": hier_bootstrap(groups, metric.worst10),
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


def _ci(t: tuple[float, float, float], signed: bool = False, scale: float = 100.0, digits: int = 1) -> str:
    est, lo, hi = (scale * v for v in t)
    if math.isnan(est):
        return "–"
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{est:{f}} [{lo:{f}}, {hi:{f}}]"


def _references(reference: str | list[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def _selected(rows: list[dict], reference: str) -> dict[str, str]:
    """Partition -> the variant a ``select`` group chose there, when ``reference`` is such a group: that
    variant's cells are the reference's own, so its paired difference is 0 by construction."""
    return {r["partition"]: r["selected_variant"] for r in rows
            if r.get("strategy") == reference and r.get("selected_variant")}


def sections(rows: list[dict], reference: str | list[str] = REFERENCE) -> list[str]:
    """Markdown sections for table.md, per metric (:func:`metrics_of`): mean and worst-10% with 95% CIs,
    and the paired differences to each reference."""
    lines: list[str] = []
    for metric in metrics_of(rows):
        lines += _metric_sections(rows, _references(reference), metric)
    return lines


def _metric_sections(rows: list[dict], references: list[str], metric: Metric) -> list[str]:
    cells = collect(rows, metric=metric)
    if not cells:
        return []
    parts = list(dict.fromkeys(p for p, _ in cells))
    strats = list(dict.fromkeys(s for _, s in cells))
    stats = {k: cell_stats(v, metric) for k, v in cells.items()}
    unseen = {k: cell_stats(v, metric) for k, v in collect(rows, "unseen", metric).items()}
    unit = f" ({metric.unit})" if metric.unit else ""
    worst = "lowest" if metric.higher_is_better else "highest"
    lines = [f"## {metric.title[0].upper() + metric.title[1:]}: mean and worst-10% with 95% bootstrap CIs{unit}", "",
             (f"Each entry: estimate [95% CI], hierarchical bootstrap ({BOOTSTRAP} draws) over seeds, then clients "
              "within a seed; clients are the trained ones (unseen: the held-out ones). worst-10% is the mean of "
              f"the {worst} ceil(10%) clients per seed; † marks tails of fewer than {MIN_WORST_CLIENTS} clients."
              + ("" if metric.higher_is_better else " Lower is better.")), ""]
    for p in parts:
        lines += [f"### {p}", "", f"| strategy | seeds | clients | {metric.title} | worst-10% | unseen |",
                  "|---|---|---|---|---|---|"]
        for s in strats:
            st = stats.get((p, s))
            if st is None:
                continue
            dag = "" if st["worst_k"] >= MIN_WORST_CLIENTS else " †"
            un = unseen.get((p, s))
            k = metric.scale
            n = metric.digits
            lines.append(f"| {s} | {st['seeds']} | {st['clients']} | {_ci(st['mean'], scale=k, digits=n)} | "
                         f"{_ci(st['worst10'], scale=k, digits=n)}{dag} | "
                         f"{_ci(un['mean'], scale=k, digits=n) if un else '–'} |")
        lines.append("")
    for reference in references:
        if not any(s == reference for _, s in cells):
            lines += [f"No paired differences: the grid has no strategy labelled {reference!r}.", ""]
            continue
        if all(s == reference for s in strats):
            continue
        d_unit = " (percentage points)" if metric.unit == "%" else ""
        better = "" if metric.higher_is_better else f" Negative = lower {metric.title.split(' (')[0]} than the reference (better)."
        lines += [f"## {metric.title[0].upper() + metric.title[1:]}: paired difference to {reference}{d_unit}", "",
                  (f"strategy − {reference} on the same seeds, partitions and clients: estimate [95% CI]. "
                   f"**Bold** with * = the CI excludes 0.{better}"), "",
                  "| strategy | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
        chosen = _selected(rows, reference)
        if chosen:
            lines[-4] += " \"selected\": the variant whose cells are the reference's in that setting."
        for s in strats:
            if s == reference:
                continue
            cols = []
            for p in parts:
                if chosen.get(p) == s:
                    cols.append("selected")
                    continue
                d = paired(cells[(p, s)], cells[(p, reference)]) if (p, s) in cells and (p, reference) in cells else None
                text = "–" if d is None else _ci(d["diff"], signed=True, scale=metric.scale, digits=metric.digits)
                cols.append(f"**{text}** *" if d is not None and d["significant"] else text)
            lines.append(f"| {s} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


def plot(rows: list[dict], out: Path, reference: str | list[str] = REFERENCE) -> None:
    """Per metric: plots/<metric>_ci.png (means with 95% CI error bars) and the forest plot of paired
    differences to each reference: plots/paired_diff.png for accuracy to the first reference (LLM grids:
    paired_diff_perplexity.png), with ``_<reference>`` added for the further references."""
    for metric in metrics_of(rows):
        _plot_metric(rows, out, _references(reference), metric)


def _plot_metric(rows: list[dict], out: Path, references: list[str], metric: Metric) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpers.results.plotting import categorical

    cells = collect(rows, metric=metric)
    if not cells:
        return
    out.mkdir(parents=True, exist_ok=True)
    parts = list(dict.fromkeys(p for p, _ in cells))
    strats = list(dict.fromkeys(s for _, s in cells))
    colours = categorical(len(parts))
    k = metric.scale
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(strats) * len(parts)), 4))
    width = 0.8 / len(parts)
    for j, p in enumerate(parts):
        est = np.full(len(strats), np.nan)
        err = np.zeros((2, len(strats)))
        for i, s in enumerate(strats):
            if (p, s) in cells:
                e, lo, hi = (k * v for v in cell_stats(cells[(p, s)], metric)["mean"])
                est[i], err[:, i] = e, (e - lo, hi - e)
        ax.bar(np.arange(len(strats)) + j * width, est, width, yerr=err, label=p, capsize=2, color=colours[j])
    ax.set_xticks(np.arange(len(strats)) + 0.4 - width / 2, strats, rotation=45, ha="right")
    unit = f" ({metric.unit})" if metric.unit else ""
    ax.set_ylabel(f"{metric.title}{unit}")
    ax.set_title(f"Mean {metric.title} per strategy; error bars: 95% bootstrap CI over seeds and clients", fontsize=9)
    if metric.higher_is_better and metric.unit == "%":
        ax.set_ylim(0, 100)
    ax.legend(title="setting", fontsize=7, title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{metric.name}_ci.png", dpi=120)
    plt.close(fig)

    for n, reference in enumerate(references):
        others = [s for s in strats if s != reference]
        if not others or not any(s == reference for _, s in cells):
            continue
        fig, axes = plt.subplots(1, len(parts), figsize=(3 * len(parts), 0.35 * len(others) + 1.8), sharey=True,
                                 squeeze=False)
        chosen = _selected(rows, reference)
        for ax, p in zip(axes[0], parts):
            for i, s in enumerate(others):
                if chosen.get(p) == s:  # the reference's own cells
                    ax.plot(0, i, marker="s", mfc="none", color="0.4")
                    continue
                d = paired(cells[(p, s)], cells[(p, reference)]) if (p, s) in cells and (p, reference) in cells else None
                if d is None:
                    continue
                e, lo, hi = (k * v for v in d["diff"])
                ax.errorbar(e, i, xerr=[[e - lo], [hi - e]], fmt="o", color="C3" if d["significant"] else "C0",
                            capsize=2)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_title(p, fontsize=9)
            d_unit = " (pp)" if metric.unit == "%" else ""
            ax.set_xlabel(f"strategy − {reference}{d_unit}", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        axes[0][0].set_yticks(range(len(others)), others)
        axes[0][0].invert_yaxis()
        fig.suptitle(f"{metric.title[0].upper() + metric.title[1:]}: paired difference to {reference}, 95% CI bars "
                     "(red: the CI excludes 0)" + ("; hollow square: the variant selected as the reference"
                                                   if chosen else ""), fontsize=9)
        fig.tight_layout()
        suffix = ("" if metric.name == "accuracy" else f"_{metric.name}") + ("" if n == 0 else f"_{reference}")
        fig.savefig(out / f"paired_diff{suffix}.png", dpi=120)
        plt.close(fig)
