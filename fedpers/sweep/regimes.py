"""Regime maps: a strategy's paired difference to a reference method along a numeric grid axis.

A grid with an ``axis`` (``fedpers.sweep.cli``: one config field swept over numbers, e.g. the training
examples per client ``data.max_train_per_client``) runs every (setting, strategy, seed) at each value. For
each setting and value, ``d = acc(strategy) - acc(reference)`` per (seed, client) pair, bootstrapped as in
:mod:`fedpers.sweep.stats` (seeds, then clients within a seed). ``regimes.png`` draws ``d`` with its 95%
CI band against the axis (log scale), one line per strategy and one panel per setting;
``regimes_unseen.png`` the same for the held-out clients. :func:`crossovers` reads off, per strategy and
setting, the axis values at which the strategy beats the reference with a CI that excludes 0.

Rows are ``runs.csv`` rows that carry ``setting`` (the partition label without the axis level) and
``axis_value`` (a number; the uncapped value, e.g. 0 = no cap, is drawn at the right end as "full").
"""

from __future__ import annotations

import math
from pathlib import Path

from fedpers.sweep.stats import paired, per_client

FULL_LABEL = "full"


def _value(v) -> float:
    return math.inf if float(v) == 0 else float(v)


def collect_axis(rows: list[dict], key: str = "final") -> dict[tuple[str, str, float], dict[int, dict[str, float]]]:
    """{(setting, strategy, axis value): {seed: {client: accuracy}}}; an uncapped value (0) becomes inf."""
    out: dict[tuple[str, str, float], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("axis_value") in (None, ""):
            continue
        try:
            acc = per_client(r, key)
        except (OSError, ValueError, KeyError):
            continue
        if acc:
            k = (r["setting"], r["strategy"], _value(r["axis_value"]))
            out.setdefault(k, {})[int(r["seed"])] = acc
    return out


def regime_diffs(rows: list[dict], reference: str, key: str = "final") -> dict[tuple[str, str], list[tuple]]:
    """{(setting, strategy): [(axis value, est, low, high, significant), ...] sorted by value}."""
    cells = collect_axis(rows, key)
    out: dict[tuple[str, str], list[tuple]] = {}
    for (setting, strat, v), by_seed in cells.items():
        if strat == reference or (setting, reference, v) not in cells:
            continue
        d = paired(by_seed, cells[(setting, reference, v)])
        if d is not None:
            out.setdefault((setting, strat), []).append((v, *d["diff"], d["significant"]))
    return {k: sorted(v) for k, v in out.items()}


def crossovers(rows: list[dict], reference: str, key: str = "final") -> list[str]:
    """Markdown: per setting and strategy, the axis values where it beats (or loses to) the reference."""
    diffs = regime_diffs(rows, reference, key)
    if not diffs:
        return []

    def fmt(v):
        return FULL_LABEL if math.isinf(v) else f"{v:g}"

    what = "trained" if key == "final" else "held-out (unseen)"
    lines = [f"## Where each strategy beats {reference} ({what} clients)", "",
             (f"Axis values at which strategy − {reference} has a 95% CI above 0 (better) or below 0 (worse); "
              "paired over seeds and clients as in the tables above."), "",
             "| setting | strategy | better at | worse at | largest value where better |", "|---|---|---|---|---|"]
    for (setting, strat), pts in sorted(diffs.items()):
        better = [v for v, _e, lo, _h, sig in pts if sig and lo > 0]
        worse = [v for v, _e, _l, hi, sig in pts if sig and hi < 0]
        lines.append(f"| {setting} | {strat} | {', '.join(map(fmt, better)) or '–'} | "
                     f"{', '.join(map(fmt, worse)) or '–'} | {fmt(max(better)) if better else '–'} |")
    return lines + [""]


def plot_regimes(rows: list[dict], out: Path, reference: str, axis_name: str) -> list[Path]:
    """plots/regimes.png and plots/regimes_unseen.png (when held-out clients exist); the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fedpers.results.plotting import categorical

    written = []
    for key, name in (("final", "regimes.png"), ("unseen", "regimes_unseen.png")):
        diffs = regime_diffs(rows, reference, key)
        if not diffs:
            continue
        settings = list(dict.fromkeys(s for s, _ in diffs))
        strats = list(dict.fromkeys(s for _, s in diffs))
        colors = dict(zip(strats, categorical(len(strats))))
        finite = sorted({v for pts in diffs.values() for v, *_ in pts if not math.isinf(v)})
        full_x = (finite[-1] * 2 if finite else 1.0)  # where "full" (no cap) is drawn
        fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), sharey=True, squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for strat in strats:
                pts = diffs.get((setting, strat))
                if not pts:
                    continue
                x = np.array([full_x if math.isinf(v) else v for v, *_ in pts])
                est, lo, hi = (100 * np.array([p[i] for p in pts]) for i in (1, 2, 3))
                ax.plot(x, est, "o-", color=colors[strat], label=strat, ms=3, lw=1.2)
                ax.fill_between(x, lo, hi, color=colors[strat], alpha=0.15, lw=0)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xscale("log")
            ticks = finite + ([full_x] if any(math.isinf(v) for pts in diffs.values() for v, *_ in pts) else [])
            ax.set_xticks(ticks, [FULL_LABEL if t == full_x and t not in finite else f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_title(setting, fontsize=9)
            ax.set_xlabel(axis_name)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"strategy − {reference} (pp), 95% CI band")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        who = "trained clients" if key == "final" else "held-out (unseen) clients"
        fig.suptitle(f"Paired difference to {reference} along {axis_name}: {who}", fontsize=10)
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    return written
