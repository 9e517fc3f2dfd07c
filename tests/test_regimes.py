"""Regime maps along a numeric grid axis: paired differences to the reference per axis value."""

import json
import math

import numpy as np

from fedpers.sweep.regimes import collect_axis, crossovers, plot_regimes, regime_diffs


def _rows(tmp_path, shift_by_value):
    """local and 'gen' at each axis value, 3 seeds x 8 clients; gen = local + shift_by_value[v] + tiny noise."""
    rng = np.random.default_rng(0)
    rows = []
    for v, shift in shift_by_value.items():
        for seed in range(3):
            base = rng.uniform(0.3, 0.8, size=8)
            for strat, acc in (("local", base), ("gen", base + shift + rng.normal(0, 1e-3, size=8))):
                d = tmp_path / f"n{v}" / strat / f"seed{seed}"
                d.mkdir(parents=True)
                per = {str(c): float(a) for c, a in enumerate(acc)}
                (d / "summary.json").write_text(json.dumps({"final": {"per_client": per},
                                                            "unseen": {"per_client": per}}))
                rows.append({"status": "ok", "setting": "dir0.5", "strategy": strat, "seed": seed,
                             "axis_value": v, "output_dir": str(d), "partition": f"dir0.5/n{v}"})
    return rows


def test_paired_difference_per_axis_value_is_the_hand_computed_mean(tmp_path):
    rows = _rows(tmp_path, {2: 0.10, 8: 0.0, 0: -0.05})
    diffs = regime_diffs(rows, "local")
    pts = diffs[("dir0.5", "gen")]
    assert [p[0] for p in pts] == [2, 8, math.inf]  # 0 = no cap, drawn last
    cells = collect_axis(rows)
    for v, est, lo, hi, _sig in pts:
        hand = np.mean([np.mean([cells[("dir0.5", "gen", v)][s][c] - cells[("dir0.5", "local", v)][s][c]
                                 for c in cells[("dir0.5", "local", v)][s]]) for s in range(3)])
        assert abs(est - hand) < 1e-12
        assert lo <= est <= hi


def test_crossovers_name_where_a_strategy_beats_and_loses_to_the_reference(tmp_path):
    rows = _rows(tmp_path, {2: 0.10, 8: 0.0, 0: -0.05})
    table = "\n".join(crossovers(rows, "local"))
    line = next(line for line in table.splitlines() if line.startswith("| dir0.5 | gen |"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[2] == "2" and cols[3] == "full" and cols[4] == "2"


def test_regime_plots_are_written_for_trained_and_unseen_clients(tmp_path):
    rows = _rows(tmp_path / "cells", {2: 0.10, 16: 0.0})
    written = plot_regimes(rows, tmp_path / "plots", "local", "training examples per client")
    assert [p.name for p in written] == ["regimes.png", "regimes_unseen.png"]
    assert all(p.stat().st_size > 5000 for p in written)
