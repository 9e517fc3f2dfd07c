"""Choosing on validation, never on test: the validation-best round of each cell and a grid's tuned
variants.

A cell run with ``data.val_fraction > 0`` has a ``validation`` block in its summary.json
(:mod:`fedpers.results.validation`): the round with the best mean validation score (accuracy, or for a
causal LM perplexity) and every client's latest test figures as of that round. :func:`val_fields` puts
them in runs.csv beside the last round's.

A grid's ``select`` key names groups of variants of one method, e.g. a generator learning rate::

    strategies:
      - pfedpg_lr1e-3: {strategy.name: pfedpg, strategy.server_lr: 0.001}
      - pfedpg_lr1e-2: {strategy.name: pfedpg, strategy.server_lr: 0.01}
    select:
      pfedpg: [pfedpg_lr1e-3, pfedpg_lr1e-2]

For each partition setting, :func:`selected_rows` picks the variant with the best validation score
(mean over its seeds, each cell's score at its validation-best round) and reports its cells under the
group's label, in every table, CI and plot. Test data never enters the choice.
"""

from __future__ import annotations

import math

import numpy as np

from fedpers.config import ConfigError


def val_fields(summary: dict) -> dict:
    """runs.csv's validation columns from one cell's summary.json (empty strings without a split)."""
    v = summary.get("validation") or {}
    if not v:
        return {"val_criterion": "", "val_score": "", "val_best_round": "", "accuracy_at_best_val": "",
                "perplexity_at_best_val": ""}
    best = v["at_best_round"]
    return {"val_criterion": v["criterion"], "val_score": best[v["criterion"]], "val_best_round": v["best_round"],
            "accuracy_at_best_val": best.get("accuracy_mean"), "perplexity_at_best_val": best.get("perplexity_mean", "")}


def parse_select(raw, labels: list[str]) -> dict[str, list[str]]:
    """The grid's ``select`` key: {group label: [variant labels, at least 2]}, each a strategy label of the
    grid, the group label not one of them."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("grid.select", "must map a label to a list of the grid's strategy labels, "
                                         "e.g. {pfedpg: [pfedpg_lr1e-3, pfedpg_lr1e-2]}")
    out = {}
    for group, variants in raw.items():
        if not isinstance(variants, list) or len(variants) < 2:
            raise ConfigError(f"grid.select.{group}", f"must list at least 2 strategy labels, got {variants!r}")
        bad = [v for v in variants if v not in labels]
        if bad:
            raise ConfigError(f"grid.select.{group}", f"{bad[0]!r} is not one of the grid's strategy labels: "
                                                      f"{', '.join(labels)}")
        if group in labels:
            raise ConfigError(f"grid.select.{group}", "the group's label must differ from every strategy label")
        out[str(group)] = [str(v) for v in variants]
    return out


def _score(r: dict) -> float:
    try:
        s = float(r.get("val_score"))
    except (TypeError, ValueError):
        return math.nan
    return -s if r.get("val_criterion") == "val_perplexity_mean" else s  # higher is better


def selected_rows(rows: list[dict], select: dict[str, list[str]]) -> tuple[list[dict], list[str]]:
    """Rows of each group's validation-selected variant relabelled as the group, and one note line per
    (group, partition) saying which variant won on what validation score."""
    ok = [r for r in rows if r["status"] == "ok"]
    out, notes = [], []
    for group, variants in select.items():
        for p in dict.fromkeys(r["partition"] for r in ok):
            scores = {}
            for v in variants:
                vals = [_score(r) for r in ok if r["partition"] == p and r["strategy"] == v]
                if vals and all(math.isfinite(x) for x in vals):
                    scores[v] = float(np.mean(vals))
            if not scores:
                notes.append(f"- {group} on {p}: no variant has a validation score (set data.val_fraction > 0)")
                continue
            best = max(variants, key=lambda v: scores.get(v, -math.inf))  # ties: the first listed
            out += [{**r, "strategy": group, "selected_variant": best} for r in ok
                    if r["partition"] == p and r["strategy"] == best]
            shown = ", ".join(f"{v} {scores[v]:.4g}" for v in variants if v in scores)
            notes.append(f"- {group} on {p}: {best} (mean validation score over seeds: {shown})")
    return out, notes
