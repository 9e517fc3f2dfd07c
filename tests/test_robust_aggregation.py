"""Robust aggregation of the averaging strategies (strategies/_robust.py): hand-computed aggregates,
agreement with Flower's own functions, config errors, and one in-bound attacker among honest clients."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedpers.config import ConfigError
from fedpers.experiment import load_config
from fedpers.payload import Reply
from fedpers.rounds.faults import POISON_NORM, FaultyTransport
from fedpers.rounds.server import build_strategy, run_server
from strategies._robust import clip_to_median_norm, coordinate_median, robust_combine, trimmed_mean
from tests.conftest import tiny_overrides

METRICS = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.5, "num_test": 4.0}


def stack(*rows):
    return np.array(rows, dtype=np.float64)


def test_coordinate_median_of_odd_and_even_counts():
    # Odd: the middle value of each coordinate, whichever client it comes from.
    np.testing.assert_array_equal(coordinate_median(stack([1, 10], [2, -5], [100, 0])), [2, 0])
    # Even: the mean of the two middle values (np.median, as Flower's aggregate_median).
    np.testing.assert_array_equal(coordinate_median(stack([1, 7], [4, -1], [2, 3], [100, 5])), [3, 4])


def test_trimmed_mean_cuts_floor_beta_n_from_each_end():
    five = stack([1, -50], [2, 0], [3, 6], [4, 3], [1000, 3])
    # beta 0.2 of 5: one value cut from each end of every coordinate: mean(2, 3, 4), mean(0, 3, 3).
    np.testing.assert_array_equal(trimmed_mean(five, 0.2), [3, 2])
    # beta 0.4 of 5: two from each end: the median.
    np.testing.assert_array_equal(trimmed_mean(five, 0.4), coordinate_median(five))
    # beta 0.2 of 4: floor(0.8) = 0 values cut, the plain mean (outlier included).
    np.testing.assert_allclose(trimmed_mean(five[:4], 0.2), five[:4].mean(axis=0))
    np.testing.assert_allclose(trimmed_mean(five, 0.0), five.mean(axis=0))
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(five, 0.5)


def test_relative_norm_bound_clips_to_c_times_the_median_norm():
    deltas = [{"p": np.array([3.0, 4.0])}, {"p": np.array([0.0, 1.0])}, {"p": np.array([6.0, 8.0])}]
    # Norms 5, 1, 10: median 5; c = 1 scales the third down to norm 5 and leaves the others.
    clipped, n, bound = clip_to_median_norm(deltas, 1.0)
    assert (n, bound) == (1, 5.0)
    np.testing.assert_allclose([d["p"] for d in clipped], [[3, 4], [0, 1], [3, 4]])
    # Then the (uniformly weighted) mean of the clipped deltas.
    agg, metrics = robust_combine(deltas, np.full(3, 1 / 3), ["p"], "none", 0.2, 1.0)
    np.testing.assert_allclose(agg["p"], [2, 3])
    assert metrics == {"robust_clipped": 1.0, "robust_norm_bound": 5.0}
    # c = 2: bound 10, nobody is over it.
    assert clip_to_median_norm(deltas, 2.0)[1] == 0


def test_rules_match_flowers_fedmedian_and_fedtrimmedavg():
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

    rng = np.random.default_rng(0)
    g = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    deltas = [{k: rng.standard_normal(v.shape) * (1 + 20 * (i == 2)) for k, v in g.items()} for i in range(5)]
    # Flower aggregates the clients' parameters, global + delta; num_examples is ignored by both.
    results = [([g[k] + d[k] for k in g], 10 * (i + 1)) for i, d in enumerate(deltas)]
    for rule, theirs in (("median", aggregate_median(results)), ("trimmed_mean", aggregate_trimmed_avg(results, 0.2))):
        ours, _ = robust_combine(deltas, np.full(5, 0.2), list(g), rule, 0.2, 0.0)
        for k, t in zip(g, theirs):
            np.testing.assert_allclose(g[k] + ours[k], t, rtol=1e-12, atol=1e-12, err_msg=f"{rule} {k}")


@pytest.mark.parametrize(
    "override, match",
    [
        ("strategy.robust_aggregation=mean", "allowed: none, median, trimmed_mean"),
        ("strategy.trim_fraction=0.5", r"\[0, 0.5\)"),
        ("strategy.norm_bound_relative=-1", ">= 0"),
    ],
)
def test_bad_robust_fields_name_the_field_and_allowed_values(override, match):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, ["strategy.name=fedavg", override])
    assert e.value.field == field


def test_trim_fraction_without_trimmed_mean_is_refused_and_the_cli_exits_2(tmp_path, capsys):
    from fedpers import simulate

    with pytest.raises(ConfigError, match="only applies with strategy.robust_aggregation=trimmed_mean"):
        load_config(None, ["strategy.name=fedavg", "strategy.trim_fraction=0.1"])
    load_config(
        None, ["strategy.name=fedavg", "strategy.robust_aggregation=trimmed_mean", "strategy.trim_fraction=0.1"]
    )
    assert (
        simulate.main(
            [
                *tiny_overrides(tmp_path / "o"),
                "strategy.name=fedvpt",
                "strategy.robust_aggregation=mode",
                "--show-config",
            ]
        )
        == 2
    )
    assert "strategy.robust_aggregation" in capsys.readouterr().err


class Honest:
    """Training-free clients: client p always sends 0.01 * (p + 1) in every coordinate."""

    def exchange(self, server_round, payloads, timeout):
        return {
            pid: Reply(
                pid,
                {f"delta/{k}": np.full(v.shape, 0.01 * (pid + 1), np.float32) for k, v in arrays.items()},
                10,
                dict(METRICS),
            )
            for pid, arrays in payloads.items()
        }


ROUNDS, N = 3, 5


@pytest.fixture
def attacked(tmp_path, monkeypatch):
    """fedavg, N clients x ROUNDS rounds, client 4 honest or poisoning -> the final global tensors, flat."""
    import fedpers.results.ledger

    monkeypatch.setattr(fedpers.results.ledger, "plot_results", lambda *a, **k: None)  # plots: not the subject

    def run(name, attack, **robust):
        cfg = load_config(
            None,
            tiny_overrides(
                tmp_path / name,
                **{
                    "strategy.name": "fedavg",
                    "run.num_clients": N,
                    "run.clients_per_round": N,
                    "run.rounds": ROUNDS,
                    "strategy.weighting": "uniform",
                    **{f"strategy.{k}": v for k, v in robust.items()},
                },
            ),
        )
        strategy = build_strategy(cfg)
        run_server(cfg, FaultyTransport(Honest(), {(4, None): "poison"} if attack else {}), strategy)
        rows = [json.loads(x) for x in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
        assert all(r["applied"] and not r["failures"] for r in rows)  # the poison passes every reply check
        g = strategy.state_dict()["global"]
        return np.concatenate([g[k].ravel() for k in sorted(g)]).astype(np.float64)

    return run


def largest_honest_norm(numel: int) -> float:
    return 0.05 * np.sqrt(numel)  # client 4's honest delta norm, the largest


def test_one_in_bound_attacker_moves_the_plain_mean_by_its_norm_over_n(attacked):
    honest = attacked("plain_h", False)
    shift = np.linalg.norm(attacked("plain", True) - honest)
    # Client 4's delta goes from 0.05 per coordinate to one of norm POISON_NORM (a fixed direction, nearly
    # orthogonal to the honest one): the mean moves by about POISON_NORM / N every round, the same way.
    assert shift == pytest.approx(ROUNDS * POISON_NORM / N, rel=1e-3)
    assert shift > 100 * 2 * ROUNDS * largest_honest_norm(honest.size)  # far outside the robust bound below


@pytest.mark.parametrize(
    "robust",
    [{"robust_aggregation": "median"}, {"robust_aggregation": "trimmed_mean"}, {"norm_bound_relative": 2.0}],
    ids=lambda r: "-".join(map(str, r.values())),
)
def test_one_in_bound_attacker_cannot_move_a_robust_aggregate(attacked, robust):
    honest = attacked("robust_h", False, **robust)
    gap = np.linalg.norm(attacked("robust", True, **robust) - honest)
    # Within 2 x (largest honest delta norm) per round of the honest run: the median and the trimmed mean
    # lie within the honest values of every coordinate, and the bound clips the attacker to c x the median
    # norm, which the honest clients set.
    assert gap <= 2 * ROUNDS * largest_honest_norm(honest.size)
