"""What the plots say: titles, integer round ticks, every client named with its test-split size, accuracy
axes from 0, colour-blind-safe colours, legends that match the points, labelled colour bars."""

import json

import matplotlib
import pytest
from matplotlib.figure import Figure

from fedpers.results import plotting

matplotlib.use("Agg")


@pytest.fixture
def saved(monkeypatch):
    """Every figure saved during the test, by file name, drawn so tick labels exist."""
    figs = {}
    real = Figure.savefig

    def record(self, fname, *a, **k):
        self.canvas.draw()
        figs[str(fname).rsplit("/", 1)[-1]] = self
        return real(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", record)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a, **k: None)
    return figs


def test_wilson_interval_is_wide_for_few_test_examples_and_narrow_for_many():
    lo5, hi5 = plotting.wilson(5, 5)
    lo200, hi200 = plotting.wilson(200, 200)
    assert hi5 == hi200 == 1.0
    assert lo5 < 0.6  # 5 correct of 5 is compatible with 60% accuracy
    assert lo200 > 0.97  # 200 of 200 is not
    assert plotting.wilson(0, 0) == (0.0, 1.0)


def test_wilson_interval_contains_the_measured_accuracy_at_every_count():
    # At 0 or n correct, rounding used to leave p an ulp outside the interval (e.g. 6 of 6, 0 of 11), and
    # the per-client plot's error bars then went negative and crashed a finished run.
    for n in range(1, 120):
        for c in range(n + 1):
            lo, hi = plotting.wilson(c, n)
            assert 0.0 <= lo <= c / n <= hi <= 1.0, (c, n, lo, hi)


def test_per_client_plot_survives_perfect_and_zero_scores(tmp_path, saved):
    from fedpers.results.ledger import plot_results

    (tmp_path / "partitions").mkdir()
    (tmp_path / "partitions" / "partitions.json").write_text(json.dumps({"num_test": [6, 11, 21]}))
    rows = [{"round": 1, "accuracy_mean": 0.6, "accuracy_worst10": 0.0}]
    summary = {"strategy": "fedvpt", "dataset": "fonts", "partitioner": "pathological", "seed": 0,
               "final": {"accuracy_mean": 0.67, "per_client": {"0": 1.0, "1": 0.0, "2": 1.0}}}
    plot_results(rows, summary, tmp_path, "pathological, seed 0")
    bars = saved["accuracy_per_client.png"].axes[0]
    err = next(c for c in bars.collections if c.get_segments()).get_segments()
    assert err[0][1][1] == 1.0 and err[1][0][1] == 0.0  # the bars end at the score they bound


def test_categorical_colours_are_distinct_and_avoid_red_green_pairs():
    for n in (2, 9, 10, 15):
        cols = [matplotlib.colors.to_hex(c) for c in plotting.categorical(n)]
        assert len(set(cols)) == n
    assert "#ff0000" not in plotting.categorical(10) and "#00ff00" not in plotting.categorical(10)


def test_result_plots_name_the_run_every_client_and_its_test_size(tmp_path, saved):
    from fedpers.results.ledger import plot_results

    (tmp_path / "partitions").mkdir()
    (tmp_path / "partitions" / "partitions.json").write_text(json.dumps({"num_test": [5, 200, 40]}))
    rows = [{"round": r, "accuracy_mean": 0.5 + r / 100, "accuracy_worst10": 0.3} for r in range(1, 8)]
    summary = {"strategy": "pfedpg", "dataset": "digits", "partitioner": "dirichlet", "seed": 3,
               "final": {"accuracy_mean": 0.6, "per_client": {"0": 1.0, "1": 0.5, "2": 0.3}}}
    plot_results(rows, summary, tmp_path, "dirichlet(alpha=0.1), seed 3")
    curve = saved["accuracy_per_round.png"].axes[0]
    assert all(t == int(t) for t in curve.get_xticks()), curve.get_xticks()
    assert {"pfedpg", "dirichlet(alpha=0.1)", "seed 3"} <= set(curve.get_title().replace(" on ", ", ").split(", "))
    assert curve.get_ylim()[0] == 0
    bars = saved["accuracy_per_client.png"].axes[0]
    labels = [t.get_text() for t in bars.get_xticklabels()]
    assert labels == ["0\n(test 5)", "1\n(test 200)", "2\n(test 40)"]
    assert "seed 3" in bars.get_title() and bars.get_ylim()[0] == 0
    # The error bar of the 5-image client is much longer than the 200-image one's.
    err = next(c for c in bars.collections if c.get_segments()).get_segments()
    assert abs(err[0][1][1] - err[0][0][1]) > 3 * abs(err[1][1][1] - err[1][0][1])


def test_partition_heatmap_has_a_labelled_colour_bar_and_named_clients(tmp_path, saved):
    from fedpers.experiment import load_config
    from fedpers.data import build_federated
    from fedpers.data.stats import describe_setting, write_report

    cfg = load_config(None, ["run.num_clients=4", "run.clients_per_round=4", "run.seed=2"])
    fed = build_federated(cfg.data, 4, 2)
    rep = write_report(fed, tmp_path, describe_setting(cfg.data, 2))
    heat = saved["label_heatmap.png"]
    main, bar = heat.axes
    assert bar.get_ylabel() == "% of the client's samples"
    assert main.get_ylabel() and main.get_xlabel() == "label"
    assert [t.get_text() for t in main.get_yticklabels()] == [f"client {i} (test {n})"
                                                              for i, n in enumerate(rep["num_test"])]
    assert "seed 2" in main.get_title() and "Jensen-Shannon" in main.get_title()
    dist = saved["label_distribution.png"].axes[0]
    assert [t.get_text() for t in dist.get_legend().get_texts()] == [str(k) for k in range(fed.num_classes)]


def test_sweep_scatter_legend_matches_its_points_and_accuracy_starts_at_zero(tmp_path, saved):
    from fedpers.sweep.cli import plot

    rows = [{"status": "ok", "partition": p, "strategy": s, "seed": seed, "accuracy_mean": acc,
             "bytes_per_round": b}
            for p in ("dir0.1", "path2") for seed in (0, 1)
            for s, acc, b in (("local", 0.707, 0), ("fedvpt", 0.708, 1e4), ("pfedpg", 0.710, 1e4))]
    plot(rows, tmp_path)
    fig = saved["accuracy_vs_bytes.png"]
    for ax in fig.axes:
        assert ax.get_ylim() == (0, 1)  # a 0.3-point gap must not fill the axis
        for pts in ax.collections:
            handle = next(h for h, t in zip(fig.legends[0].legend_handles, fig.legends[0].get_texts())
                          if t.get_text() == pts.get_label())
            assert matplotlib.colors.to_hex(pts.get_facecolor()[0]) == matplotlib.colors.to_hex(handle.get_color())
    bars = saved["accuracy_by_strategy.png"].axes[0]
    assert bars.get_ylim()[0] == 0 and "std over seeds" in bars.get_title()


def test_domains_plot_names_each_clients_transforms():
    from fedpers.data.stats import domain_label

    label = domain_label({"group": 2, "domain": {"rotate": -35.2, "contrast": 1.5, "invert": True,
                                                  "color": [1.1, 0.9, 1.0], "blur": 0.4}})
    assert label.splitlines() == ["group 2:", "rotate -35°", "contrast x1.50", "inverted", "color x1.10/0.90/1.00",
                                  "blur 0.40"]
    assert domain_label({"group": 0, "label_map": [1, 0]}) == ""
