"""What the plots say: titles, integer round ticks, every client named with its test-split size, accuracy
axes from 0, colour-blind-safe colours, legends that match the points, labelled colour bars."""

import itertools
import json

import matplotlib
import numpy as np
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


# Dichromat vision, simulated: Machado, Oliveira & Fernandes (2009), "A Physiologically-based Model for
# Simulation of Color Vision Deficiency", IEEE TVCG 15(6), severity-1.0 matrices, applied to linear sRGB.
CVD = {
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
    "normal": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
}
# Minimum CIELAB distance (CIE76) between two colours of one plot, in every simulated vision. matplotlib's
# tab10 red and green (#d62728, #2ca02c) are 7.3 apart under deuteranopia, the classic unreadable pair.
MIN_DELTA_E = 12.0


def lab_as_seen(colour, vision: str) -> np.ndarray:
    """CIELAB (D65) of an sRGB colour as a viewer with ``vision`` sees it."""
    c = np.asarray(matplotlib.colors.to_rgb(colour))
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    linear = np.clip(np.asarray(CVD[vision]) @ linear, 0, 1)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ linear
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def closest_pair(colours, vision: str) -> tuple[float, str, str]:
    return min((float(np.linalg.norm(lab_as_seen(a, vision) - lab_as_seen(b, vision))),
                matplotlib.colors.to_hex(a), matplotlib.colors.to_hex(b))
               for a, b in itertools.combinations(colours, 2))


def test_the_colour_vision_check_rejects_red_green():
    assert closest_pair(["#d62728", "#2ca02c"], "deuteranopia")[0] < MIN_DELTA_E
    assert closest_pair(["#d62728", "#2ca02c"], "normal")[0] > MIN_DELTA_E  # fine for typical vision


def test_categorical_colours_stay_apart_under_colour_vision_deficiencies():
    """Up to the palette's 10 colours (Tol's muted nine and grey) every pair of one plot stays apart in
    every simulated vision. Past that, viridis samples: an ordered scale, whose lightness rises
    monotonically in every simulated vision, so neighbours are told apart by order and lightness."""
    for n in range(2, len(plotting.TOL_MUTED) + 2):
        cols = plotting.categorical(n)
        for vision in CVD:
            d, a, b = closest_pair(cols, vision)
            assert d >= MIN_DELTA_E, (n, vision, a, b, d)
    for n in (11, 15, 30):
        cols = plotting.categorical(n)
        assert len({matplotlib.colors.to_hex(c) for c in cols}) == n
        for vision in CVD:
            lightness = [lab_as_seen(c, vision)[0] for c in cols]
            assert all(b > a for a, b in itertools.pairwise(lightness)), (n, vision)


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
    from fedpers.data import build_federated
    from fedpers.data.stats import describe_setting, write_report
    from fedpers.experiment import load_config

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
