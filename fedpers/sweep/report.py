"""The sweep's report: ``runs.csv``, ``table.md`` (pivots, per-setting tables, confidence intervals and
paired differences from :mod:`fedpers.sweep.stats`) and ``plots/*.png``, built from the cells' rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

COLUMNS = ["partition", "strategy", "seed", "status", "accuracy_mean", "accuracy_worst10", "unseen_accuracy_mean",
           "cross_eval_gap", "params_per_round", "bytes_per_round", "local_steps", "rounds", "wall_time_s", "output_dir",
           "error", "setting", "axis_value", "perplexity_mean", "perplexity_worst10", "unseen_perplexity_mean",
           "cross_eval_perplexity_gap", "accuracy_weighted", "val_criterion", "val_score", "val_best_round", "accuracy_at_best_val",
           "perplexity_at_best_val", "nll_mean"]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})


def _fmt(vals: list, pct: bool = True, digits: int = 1) -> str:
    v = [float(x) for x in vals if x not in (None, "") and not math.isnan(float(x))]
    if not v:
        return "–"
    k = 100.0 if pct else 1.0
    return f"{k * np.mean(v):.{digits}f} ± {k * np.std(v):.{digits}f}"


def _sci(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def _pivot(ok: list[dict], parts: list[str], strats: list[str], key: str, name: str, pct: bool = True,
           digits: int = 1) -> list[str]:
    """One line per strategy, one column per partition setting: mean ± std over seeds of ``key``."""
    lines = [f"## {name} by partition setting{' (%)' if pct else ''}", "", "| strategy | bytes/round (down + up) | " + " | ".join(parts) + " |",
             "|---|---|" + "---|" * len(parts)]
    for s in strats:
        rs = [r for r in ok if r["strategy"] == s]
        if not rs:
            continue
        cells = [_fmt([r.get(key) for r in rs if r["partition"] == p], pct, digits) for p in parts]
        lines.append(f"| {s} | {_sci(float(np.mean([r['bytes_per_round'] for r in rs])))} | " + " | ".join(cells) + " |")
    seeds = {(r["partition"], r["strategy"]): 0 for r in ok}
    for r in ok:
        seeds[(r["partition"], r["strategy"])] += 1
    counts = sorted(set(seeds.values()))
    return lines + ["", f"Seeds per cell: {', '.join(map(str, counts))}.", ""]


def write_table(rows: list[dict], path: Path, title: str, reference: str | list[str] | None = None,
                selection_notes: list[str] | None = None) -> str:
    """table.md: pivots, per-partition tables, CIs and the paired differences to ``reference`` (None: pfedpg).
    ``selection_notes``: which variant each ``select`` group took on validation (its rows are in ``rows``)."""
    ok = [r for r in rows if r["status"] == "ok"]
    parts = list(dict.fromkeys(r["partition"] for r in rows))
    strats = list(dict.fromkeys(r["strategy"] for r in rows))
    legend = ("Personalized test accuracy (%) on each client's own test split, mean ± std over seeds "
              "(std of the per-seed means), unweighted over clients; sample-weighted: sum of correct / sum of test "
              "samples over clients (PFLlib's server figure; absent for cells run before it was recorded). "
              "worst-10%: mean of the lowest 10% of clients. unseen: held-out "
              "clients after personalizing from the trained server state. gap (run.cross_eval): a personal model's "
              "accuracy on its own client minus on the others' (points). params/bytes: per client and round, "
              "down + up. steps: local optimizer steps per client and round (the local budget).")
    has_val = any(r.get("val_best_round") not in (None, "") for r in ok)
    legend += (" Test figures are at the last round" + ("; the 'at the validation-best round' tables take each "
               "cell's round with the best mean validation score (data.val_fraction), chosen without test data."
               if has_val else " (no validation split: data.val_fraction = 0)."))
    lines = [f"# {title}", "", legend, ""]
    if selection_notes:
        lines += ["## Variants selected on validation", ""] + selection_notes + [""]
    llm = any(r.get("perplexity_mean") not in (None, "") for r in ok)
    if llm:  # LLM cells: perplexity first (not a percentage); their accuracy is next-token accuracy
        legend += (" LLM cells: perplexity = exp(mean NLL per reply token) per client, averaged over clients "
                   "(lower is better; worst-10%: the highest); reply NLL = the mean NLL per reply token per client "
                   "(nats, the log of a client's perplexity), averaged over clients: one client whose adapter "
                   "diverged can carry the perplexity mean, not the NLL mean; accuracy = next-token accuracy on "
                   "reply tokens.")
        lines[2] = legend
        for key, name, digits in (("perplexity_mean", "perplexity", 1), ("nll_mean", "reply NLL (nats per token)", 3),
                                  ("perplexity_worst10", "worst-10% perplexity", 1),
                                  ("unseen_perplexity_mean", "unseen-client perplexity", 1)):
            lines += _pivot(ok, parts, strats, key, name, pct=False, digits=digits)
        if any(r.get("cross_eval_perplexity_gap") not in (None, "") for r in ok):
            lines += _pivot(ok, parts, strats, "cross_eval_perplexity_gap", "cross-evaluation perplexity gap "
                            "(a speaker's model on the other speakers minus on its own; run.cross_eval)", pct=False)
    for key, name in (("accuracy_mean", "accuracy"), ("accuracy_weighted", "sample-weighted accuracy"),
                      ("accuracy_worst10", "worst-10%"), ("unseen_accuracy_mean", "unseen-client accuracy")):
        lines += _pivot(ok, parts, strats, key, "next-token " + name if llm else name)
    if has_val:
        lines += _pivot(ok, parts, strats, "accuracy_at_best_val",
                        ("next-token accuracy" if llm else "accuracy") + " at the validation-best round")
        if llm:
            lines += _pivot(ok, parts, strats, "perplexity_at_best_val", "perplexity at the validation-best round",
                            pct=False)
    for p in parts:
        lines += [f"## {p}", "", ("| strategy | seeds | accuracy | worst-10% | unseen | gap | params/round (down + up) "
                                  "| bytes/round (down + up) | steps |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in strats:
            rs = [r for r in ok if r["partition"] == p and r["strategy"] == s]
            if not rs:
                continue
            lines.append(f"| {s} | {len(rs)} | {_fmt([r['accuracy_mean'] for r in rs])} | "
                         f"{_fmt([r['accuracy_worst10'] for r in rs])} | "
                         f"{_fmt([r['unseen_accuracy_mean'] for r in rs])} | "
                         f"{_fmt([r.get('cross_eval_gap') for r in rs])} | {_sci(rs[0]['params_per_round'])} | "
                         f"{_sci(float(np.mean([r['bytes_per_round'] for r in rs])))} | "
                         f"{_fmt([r.get('local_steps') for r in rs], pct=False)} |")
        lines.append("")
    from fedpers.sweep.stats import REFERENCE, sections  # CIs and paired differences over per-client results

    lines += sections(rows, reference or REFERENCE)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["## Failed or missing cells", ""] + [
            f"- {r['partition']}/{r['strategy']}/seed{r['seed']}: {r['status']} {r['error']}" for r in failed] + [""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(rows: list[dict], out: Path) -> None:
    """accuracy_by_strategy.png (bars: mean over seeds, error bars: std over seeds) and
    accuracy_vs_bytes.png (one panel per partition setting); accuracy axes run from 0 to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpers.results.plotting import categorical

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    out.mkdir(parents=True, exist_ok=True)
    parts = list(dict.fromkeys(r["partition"] for r in ok))
    strats = list(dict.fromkeys(r["strategy"] for r in ok))
    seeds = sorted({int(r["seed"]) for r in ok})
    colours = categorical(len(parts))
    fig, ax = plt.subplots(figsize=(min(16, max(7, 0.3 * len(strats) * len(parts) + 2)), 4.5))
    width = 0.8 / len(parts)
    for j, p in enumerate(parts):
        means, stds = [], []
        for s in strats:
            v = [r["accuracy_mean"] for r in ok if r["partition"] == p and r["strategy"] == s]
            means.append(np.mean(v) if v else np.nan)
            stds.append(np.std(v) if v else 0)
        ax.bar(np.arange(len(strats)) + j * width, means, width, yerr=stds, label=p, capsize=2, color=colours[j])
    ax.set_xticks(np.arange(len(strats)) + 0.4 - width / 2, strats, rotation=45, ha="right")
    ax.set_ylabel("personalized accuracy (axis from 0)")
    ax.set_title(f"Mean personalized accuracy over seeds {', '.join(map(str, seeds))}; "
                 "error bars: std over seeds", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(title="partition setting", fontsize=7, title_fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_strategy.png", dpi=120)
    plt.close(fig)

    llm = any(r.get("perplexity_mean") not in (None, "") for r in ok)
    _vs_bytes(ok, parts, strats, out, "accuracy_mean", "next-token accuracy" if llm else "personalized accuracy")
    if llm:
        _vs_bytes(ok, parts, strats, out, "perplexity_mean", "perplexity")
        _vs_bytes(ok, parts, strats, out, "nll_mean", "reply NLL (nats per token)")


def _vs_bytes(ok: list[dict], parts: list[str], strats: list[str], out: Path, key: str, what: str) -> None:
    """<metric>_vs_bytes.png: one panel per setting, one marker per strategy (colour and shape), the same
    in every panel and the legend: the points of several strategies with equal bytes would hide each
    other's labels."""
    import matplotlib.pyplot as plt

    from fedpers.results.plotting import TOL_MUTED

    markers = "osD^vPX*<>"
    style = {s: (TOL_MUTED[i % len(TOL_MUTED)], markers[i // len(TOL_MUTED) % len(markers)] if len(strats) > 9
                 else markers[i % len(markers)]) for i, s in enumerate(strats)}
    fig, axes = plt.subplots(1, len(parts), figsize=(2.6 * len(parts) + 2, 3.8), sharey=True, squeeze=False)
    bounded = key.startswith("accuracy")
    for ax, p in zip(axes[0], parts):
        seen: dict[float, int] = {}  # strategies with the same bytes: nudged apart so none hides another
        for s in strats:
            rs = [r for r in ok if r["partition"] == p and r["strategy"] == s and r.get(key) not in (None, "")]
            if rs:
                b = float(np.mean([float(r["bytes_per_round"]) for r in rs]))
                k = seen.get(round(b), 0)
                seen[round(b)] = k + 1
                x = b * (1 + 0.12 * k) if b > 0 else 0.25 * k  # symlog: 0 bytes (local training) sits at 0
                ax.scatter(x, np.mean([float(r[key]) for r in rs]), color=style[s][0], marker=style[s][1],
                           s=36, edgecolor="black", linewidth=0.4, label=s)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=-0.5)
        top = max([float(r["bytes_per_round"]) for r in ok] + [10.0])
        ticks = [0.0] + [10.0 ** e for e in range(0, math.ceil(math.log10(top)) + 1, 2)]
        ax.set_xticks(ticks, ["0"] + [f"$10^{{{e}}}$" for e in range(0, math.ceil(math.log10(top)) + 1, 2)])
        ax.minorticks_off()
        ax.set_title(p, fontsize=9)
        if bounded:
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("bytes/client/round (down + up; symlog,\n0 = nothing sent; equal bytes offset)", fontsize=8)
    axes[0][0].set_ylabel(f"{what} (axis from 0)" if bounded else f"{what} (lower is better)")
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", markeredgecolor="black", markeredgewidth=0.4)
               for c, m in style.values()]
    fig.legend(handles, list(style), title="strategy", fontsize=7, title_fontsize=8, loc="center right")
    fig.suptitle(f"{what[0].upper() + what[1:]} against communication, mean over seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (2.6 * len(parts) + 2), 1))
    name = key.removesuffix("_mean")
    fig.savefig(out / f"{name}_vs_bytes.png", dpi=120)
    plt.close(fig)
