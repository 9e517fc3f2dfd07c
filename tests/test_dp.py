"""DP on client deltas: clipping bounds the joint norm, the noise has the promised scale, the
accountants bound the exact Gaussian privacy loss, and the run reports (epsilon, delta)."""

import importlib.metadata
import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from fedpers import simulate
from fedpers.config import ConfigError
from fedpers.dp import account, clip_and_noise, privacy_report
from fedpers.experiment import load_config
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import run_server
from tests.conftest import tiny_overrides


def joint_norm(arrays):
    return math.sqrt(sum(float(np.square(a.astype(np.float64)).sum()) for a in arrays.values()))


def test_clipping_bounds_the_joint_norm_and_keeps_small_deltas():
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.3, 5.0, 100.0):
        arrays = {
            "a": (rng.standard_normal((10, 16)) * scale).astype(np.float32),
            "b": (rng.standard_normal(7) * scale).astype(np.float32),
        }
        out, norm = clip_and_noise(arrays, clip_norm=1.0, noise_multiplier=0.0, generator=g)
        assert norm == pytest.approx(joint_norm(arrays))
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in arrays.items()}
        if norm <= 1.0:
            for k, v in arrays.items():
                np.testing.assert_array_equal(out[k], v)
        else:  # scaled, direction kept
            assert joint_norm(out) == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_allclose(out["a"] * norm, arrays["a"], rtol=1e-4, atol=1e-6)


def test_noise_is_gaussian_with_std_noise_multiplier_times_clip():
    g = torch.Generator().manual_seed(1)
    clip, z = 0.5, 1.3
    base = {"p": np.full((10, 128), 0.1, np.float32)}  # norm 3.58 > clip: clipped, then noised
    clipped, _ = clip_and_noise(base, clip, 0.0, g)
    noise = np.concatenate([(clip_and_noise(base, clip, z, g)[0]["p"] - clipped["p"]).ravel() for _ in range(100)])
    assert noise.size == 128_000
    # std within 1% (the sample std's relative sd is 1/sqrt(2n) = 0.2%); mean within 4 standard errors.
    assert noise.std() == pytest.approx(z * clip, rel=0.01)
    assert abs(noise.mean()) < 4 * z * clip / math.sqrt(noise.size)
    assert stats.kstest(noise / (z * clip), "norm").pvalue > 1e-3


def exact_gaussian_epsilon(z, t, delta):
    """The tight epsilon of t releases of the Gaussian mechanism with noise multiplier z, independent of
    any accountant: they compose to mu-GDP with mu = sqrt(t)/z (Dong, Roth & Su 2022, Cor. 3.3), whose
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018, Thm. 8), solved for eps."""
    mu = math.sqrt(t) / z

    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)) - delta

    return 0.0 if excess(0.0) <= 0 else optimize.brentq(excess, 0.0, 1e4, xtol=1e-12)


# (noise multiplier, releases, delta): epsilon from ~0.2 to ~70
GRID = [(z, t, d) for z in (0.8, 1.5, 4.0, 10.0) for t in (1, 5, 40) for d in (1e-3, 1e-6)]


def test_opacus_accountants_bound_the_exact_gaussian_loss_on_a_grid():
    """Both reported bounds are >= the exact loss (never under-report); PRV is within 2 eps_error of it
    (its documented accuracy), RDP within 25% (its conversion's slack; at most 20% on this grid). A wrong
    sample rate (amplification claimed), noise or release count breaks the lower or the upper bound."""
    for z, t, delta in GRID:
        exact = exact_gaussian_epsilon(z, t, delta)
        r = account(z, t, delta)
        assert exact <= r["epsilon_prv"] <= exact + 2 * r["prv_eps_error"], (z, t, delta, exact, r)
        assert exact <= r["epsilon_rdp"] <= 1.25 * exact, (z, t, delta, exact, r)
        assert r["epsilon"] == min(r["epsilon_prv"], r["epsilon_rdp"]) and r["epsilon_from"] == "prv"
    for z, t, delta in [(1.0, 10, 1e-5), (2.0, 3, 1e-6)]:  # more releases: more loss; more noise: less
        for key in ("epsilon_prv", "epsilon_rdp"):
            assert account(z, 2 * t, delta)[key] > account(z, t, delta)[key] > account(2 * z, t, delta)[key]
    huge = account(0.7, 1000, 1e-5)  # epsilon ~ 1200: whichever accountant copes, a finite valid bound
    assert exact_gaussian_epsilon(0.7, 1000, 1e-5) <= huge["epsilon"] <= huge["epsilon_rdp"]
    assert account(1.0, 0, 1e-5)["epsilon"] == 0.0
    none = account(0.0, 3, 1e-5)  # clipping without noise: no finite guarantee
    assert none["epsilon"] is none["epsilon_prv"] is none["epsilon_rdp"] is none["epsilon_from"] is None


def test_privacy_report_composes_over_the_most_sampled_clients_rounds():
    cfg = load_config(None, ["dp.clip_norm=0.5", "dp.noise_multiplier=1.3", "dp.delta=1e-6"])
    rows = [{"sampled": [0, 1]}, {"sampled": [1, 2]}, {"sampled": [2, 3]}, {"sampled": [1, 4]}]  # client 1: 3
    priv = privacy_report(cfg, rows)["privacy"]
    assert priv["max_rounds_per_client"] == 3 and priv["noise_std"] == pytest.approx(0.65)
    exact = exact_gaussian_epsilon(1.3, 3, 1e-6)
    assert exact <= priv["epsilon"] <= exact + 2 * priv["prv_eps_error"]
    assert priv["accountant"].startswith(f"opacus {importlib.metadata.version('opacus')}: PRVAccountant")
    assert privacy_report(load_config(None, []), rows) == {"privacy": {"enabled": False}}


class Recording(InProcessTransport):
    def exchange(self, server_round, payloads, timeout):
        out = super().exchange(server_round, payloads, timeout)
        self.seen = getattr(self, "seen", []) + [r.arrays for r in out.values()]
        return out


def test_run_clips_client_deltas_and_reports_epsilon(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "clip", **{"dp.clip_norm": 0.05}))
    t = Recording(cfg)
    summary = run_server(cfg, t)
    norms = [joint_norm(a) for a in t.seen]
    assert len(norms) == 6 and max(norms) <= 0.05 * (1 + 1e-5)
    assert summary["privacy"]["enabled"] and summary["privacy"]["epsilon"] is None  # clipping alone: no epsilon

    out = tmp_path / "noisy"
    over = tiny_overrides(out, **{"dp.clip_norm": 0.05, "dp.noise_multiplier": 1.0, "dp.seeded_noise": "true"})
    assert simulate.main(over) == 0
    priv = json.loads((out / "summary.json").read_text())["privacy"]
    assert priv["max_rounds_per_client"] == 2 and priv["noise_std"] == pytest.approx(0.05)
    exact = exact_gaussian_epsilon(1.0, 2, 1e-5)
    assert exact <= priv["epsilon"] <= exact + 2 * priv["prv_eps_error"] and priv["delta"] == 1e-5

    # Seeded noise is reproducible (simulation only); default noise comes from OS entropy.
    def final(name, *extra):
        rest = [o for o in over if not o.startswith(("run.output_dir=", "dp.seeded_noise="))]
        assert simulate.main(rest + [f"run.output_dir={tmp_path / name}", *extra]) == 0
        return last_round_losses(tmp_path / name)

    def last_round_losses(folder):  # test losses after round 2 depend on round 1's noisy deltas
        rows = (folder / "metrics.jsonl").read_text().splitlines()
        return {k: c["test_loss"] for k, c in json.loads(rows[-1])["clients"].items()}

    a = last_round_losses(out)
    assert a == final("again", "dp.seeded_noise=true")
    assert a != final("entropy")


def test_dp_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="dp.noise_multiplier"):
        load_config(None, ["dp.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="dp.delta"):
        load_config(None, ["dp.clip_norm=1", "dp.delta=2"])


def test_device_floor_only_tightens_the_server_settings():
    from fedpers.dp import device_floor

    server = load_config(None, ["dp.clip_norm=2.0", "dp.noise_multiplier=0.5", "dp.seeded_noise=true"])
    assert device_floor(server, {"partition-id": 0}) is server
    d = device_floor(server, {"dp-clip-norm": 1.0, "dp-noise-multiplier": 1.1}).dp
    assert (d.clip_norm, d.noise_multiplier, d.seeded_noise) == (1.0, 1.1, False)
    d = device_floor(server, {"dp-clip-norm": 5.0, "dp-noise-multiplier": 0.1}).dp  # looser: ignored
    assert (d.clip_norm, d.noise_multiplier) == (2.0, 0.5)
    d = device_floor(load_config(None, []), {"dp-clip-norm": 0.5}).dp  # server without DP: device turns it on
    assert (d.clip_norm, d.noise_multiplier) == (0.5, 0.0)
