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


def _grid(tmp_path, axis):
    import yaml

    g = {"output_dir": str(tmp_path / "out"), "base": {"run.rounds": 1, "run.num_clients": 3, "run.clients_per_round": 3},
         "strategies": ["local", "fedvpt"], "partitions": {"iid": {"data.partitioner.name": "iid"}},
         "seeds": [0], "reference": "local", "axis": axis}
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(g))
    return p


def test_grid_axis_sweeps_the_field_inside_every_setting(tmp_path):
    from fedpers.sweep.cli import load_grid

    out, cells = load_grid(_grid(tmp_path, {"field": "data.max_train_per_client", "values": [4, 16, "full"],
                                            "full_value": 0, "label": "n"}))
    got = sorted((c.partition, c.strategy, c.setting, c.axis_value, c.cfg.data.max_train_per_client) for c in cells)
    assert got == sorted((f"iid/n{lab}", s, "iid", x, v) for s in ("local", "fedvpt")
                         for lab, v, x in (("4", 4, 4.0), ("16", 16, 16.0), ("full", 0, math.inf)))
    assert {c.out for c in cells} == {out / c.partition / c.strategy / "seed0" for c in cells}


def test_a_bad_grid_axis_is_refused_naming_the_key(tmp_path, capsys):
    from fedpers.sweep.cli import main

    for axis, field in (({"field": "data.max_train_per_client", "values": [4, "all"]}, "grid.axis.values"),
                        ({"field": "data.max_train_per_client", "values": [4, "full"]}, "grid.axis.full_value"),
                        ({"field": "max", "values": [4]}, "grid.axis.field"),
                        ({"field": "data.max_train_per_client", "values": [4], "step": 2}, "grid.axis.step"),
                        ({"field": "data.no_such_field", "values": [4]}, "data.no_such_field")):
        rc = main([str(_grid(tmp_path, axis)), "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and field in err, (axis, err)
