"""DP on client deltas: clipping bounds the joint norm, the noise has the promised scale, the
accountant matches its formula, and the run reports (epsilon, delta)."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from fedpers import simulate
from fedpers.config import ConfigError
from fedpers.experiment import load_config
from fedpers.dp import clip_and_noise, gaussian_epsilon
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import run_server
from tests.conftest import tiny_overrides


def joint_norm(arrays):
    return math.sqrt(sum(float(np.square(a.astype(np.float64)).sum()) for a in arrays.values()))


def test_clipping_bounds_the_joint_norm_and_keeps_small_deltas():
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.3, 5.0, 100.0):
        arrays = {"a": (rng.standard_normal((10, 16)) * scale).astype(np.float32),
                  "b": (rng.standard_normal(7) * scale).astype(np.float32)}
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


def test_accountant_matches_its_formula_and_behaves():
    def reference(z, t, delta):  # the same conversion, minimised continuously over alpha
        f = lambda a: t * a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        return optimize.minimize_scalar(f, bounds=(1.001, 5000), method="bounded").fun

    for z, t in [(1.0, 1), (1.0, 10), (2.0, 50), (0.7, 3), (5.0, 100)]:
        eps, _ = gaussian_epsilon(z, t, 1e-5)
        assert reference(z, t, 1e-5) <= eps <= reference(z, t, 1e-5) * 1.02 + 1e-9
        # never looser than the zCDP bound rho + 2 sqrt(rho log 1/delta) (Bun & Steinke 2016)
        rho = t / (2 * z * z)
        assert eps <= rho + 2 * math.sqrt(rho * math.log(1e5)) + 1e-9
    assert gaussian_epsilon(2.0, 10, 1e-5)[0] < gaussian_epsilon(1.0, 10, 1e-5)[0]
    assert gaussian_epsilon(1.0, 20, 1e-5)[0] > gaussian_epsilon(1.0, 10, 1e-5)[0]
    assert gaussian_epsilon(1.0, 0, 1e-5)[0] == 0.0
    assert gaussian_epsilon(0.0, 3, 1e-5)[0] == math.inf


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
    assert priv["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 2, 1e-5)[0]) and priv["delta"] == 1e-5
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
