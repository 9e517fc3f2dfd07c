"""Differential privacy on client deltas: clip, add Gaussian noise, account (epsilon, delta).

Mechanism (on the client, before anything leaves it): the reply's deltas, flattened jointly, are scaled
to L2 norm at most ``C = dp.clip_norm``, then i.i.d. ``N(0, (z C)^2)`` noise is added to every coordinate,
``z = dp.noise_multiplier``. This is the local Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR'18)
and Flower's ``LocalDpMod``. Flower's DP wrappers do not fit here: they wrap Flower strategies and
expect clients to return full parameters, while fedpers' round loop has its own strategies and clients
return deltas (and the in-process engine has no Flower at all).

Accounting: neighbouring datasets differ by one client's whole contribution being zeroed out (client-
level DP), so one release has L2 sensitivity ``C`` and is the Gaussian mechanism with noise multiplier
``z``; ``T`` releases compose, ``T`` being the number of rounds the most-sampled client was sampled in.
No amplification by subsampling is claimed: the noise is added on the client and the server knows whom
it sampled, so each accountant gets ``sample_rate=1``. Both accountants are Opacus's (a maintained
library, ``opacus.accountants``): ``PRVAccountant`` (numerical composition of privacy loss random
variables, Gopi, Lee & Wutschitz, NeurIPS'21; tight up to its ``eps_error``) and ``RDPAccountant``
(Renyi DP ``alpha / (2 z^2)`` per release, Mironov 2017, converted by Balle et al. 2020, Thm. 21). Both
are upper bounds on the privacy loss; the summary reports each and takes the smaller as ``epsilon``.
What is *not* covered: the metrics a client reports (losses, accuracy, num_examples), which the
simulator needs for its ledger; a deployment that needs them private must drop or privatize them.
"""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import torch

from fedpers.config import ExperimentConfig

ALPHAS = tuple([1 + x / 20 for x in range(1, 100)] + list(range(6, 64)) + [64, 96, 128, 256, 512, 1024])


def clip_and_noise(
    arrays: dict[str, np.ndarray], clip_norm: float, noise_multiplier: float, generator: torch.Generator
) -> tuple[dict[str, np.ndarray], float]:
    """Jointly clip ``arrays`` to L2 norm ``clip_norm`` and add N(0, (noise_multiplier*clip_norm)^2).

    Returns the privatized arrays (same keys, shapes, dtypes) and the norm before clipping.
    """
    keys = sorted(arrays)
    norm = math.sqrt(sum(float(np.square(arrays[k], dtype=np.float64).sum()) for k in keys))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = {}
    for k in keys:
        a = np.asarray(arrays[k])
        clipped = torch.from_numpy(a.astype(np.float64) * scale)
        if std > 0:
            clipped = clipped + torch.randn(clipped.shape, generator=generator, dtype=torch.float64) * std
        out[k] = clipped.numpy().astype(a.dtype)
    return out, norm


def noise_generator(cfg: ExperimentConfig, server_round: int, partition_id: int) -> torch.Generator:
    """Fresh OS entropy by default: noise derived from a seed the server knows could be subtracted."""
    if cfg.dp.seeded_noise:
        seed = int(np.random.SeedSequence([cfg.run.seed, server_round, partition_id, 0xD9]).generate_state(1)[0])
    else:
        seed = secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def privatize_reply(
    cfg: ExperimentConfig, arrays: dict[str, np.ndarray], server_round: int, partition_id: int
) -> dict[str, np.ndarray]:
    """The client-side hook: identity when ``dp.clip_norm`` is 0."""
    if cfg.dp.clip_norm <= 0 or not arrays:
        return arrays
    gen = noise_generator(cfg, server_round, partition_id)
    out, _ = clip_and_noise(arrays, cfg.dp.clip_norm, cfg.dp.noise_multiplier, gen)
    return out


def rdp_epsilon(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
    """(epsilon, best alpha) of ``releases`` Gaussian releases by Opacus's RDP analysis, over ``ALPHAS``."""
    if releases == 0:
        return 0.0, float("nan")
    if noise_multiplier <= 0:
        return math.inf, float("nan")
    from opacus.accountants.analysis import rdp

    curve = rdp.compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=list(ALPHAS))
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": still an upper bound
        warnings.simplefilter("ignore", UserWarning)
        eps, alpha = rdp.get_privacy_spent(orders=list(ALPHAS), rdp=curve, delta=delta)
    return max(float(eps), 0.0), float(alpha)


def prv_eps_error(eps_rdp: float) -> float:
    """The PRV accountant's epsilon accuracy: 0.01 (Opacus's default), or 0.1% of the RDP bound when that is
    larger (its grid, hence its cost, grows with epsilon over the error; beyond epsilon ~ 10 the extra
    digits say nothing)."""
    return max(0.01, 1e-3 * eps_rdp)


def prv_epsilon(noise_multiplier: float, releases: int, delta: float, eps_error: float) -> float:
    """Opacus's PRV upper bound on epsilon for ``releases`` Gaussian releases (inf where it finds none)."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise_multiplier, 1.0, releases)]  # (noise multiplier, sample rate, steps), as step() keeps it
    # log(1 - q) at q = 1; its domain bound's RDP search warns when the best order is its largest
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eps = float(acc.get_epsilon(delta, eps_error=eps_error))
    return eps if math.isfinite(eps) else math.inf


def account(noise_multiplier: float, releases: int, delta: float) -> dict:
    """Both Opacus accountants on ``releases`` Gaussian releases; ``epsilon`` is the smaller bound."""
    eps_rdp, alpha = rdp_epsilon(noise_multiplier, releases, delta)
    eps_error = prv_eps_error(eps_rdp) if math.isfinite(eps_rdp) else 0.01
    eps_prv = prv_epsilon(noise_multiplier, releases, delta, eps_error) if math.isfinite(eps_rdp) else math.inf
    best = ("prv", eps_prv) if eps_prv <= eps_rdp else ("rdp", eps_rdp)

    def finite(x):
        return x if math.isfinite(x) else None  # None: clipping only, no (finite) guarantee

    return {
        "epsilon": finite(best[1]),
        "epsilon_from": best[0] if math.isfinite(best[1]) else None,
        "epsilon_prv": finite(eps_prv),
        "prv_eps_error": eps_error,
        "epsilon_rdp": finite(eps_rdp),
        "rdp_order": alpha if math.isfinite(alpha) else None,
    }


def privacy_report(cfg: ExperimentConfig, rows: list[dict]) -> dict:
    """The ``privacy`` entry of summary.json."""
    d = cfg.dp
    if d.clip_norm <= 0:
        return {"privacy": {"enabled": False}}
    counts: dict[int, int] = {}
    for row in rows:
        for pid in row["sampled"]:
            counts[pid] = counts.get(pid, 0) + 1
    releases = max(counts.values(), default=0)
    report = {
        "enabled": True,
        "mechanism": "client-side clipping + Gaussian noise on deltas (client-level, no subsampling amplification)",
        "clip_norm": d.clip_norm,
        "noise_multiplier": d.noise_multiplier,
        "noise_std": d.noise_multiplier * d.clip_norm,
        "max_rounds_per_client": releases,
        "delta": d.delta,
        "seeded_noise": d.seeded_noise,
    }
    if d.noise_multiplier > 0 and releases > 0:
        from importlib.metadata import version

        report["accountant"] = (
            f"opacus {version('opacus')}: PRVAccountant and RDPAccountant, Gaussian mechanism "
            f"with sample_rate=1 composed max_rounds_per_client times; epsilon = the smaller"
        )
    report.update(account(d.noise_multiplier, releases, d.delta))
    return {"privacy": report}


def device_floor(cfg: ExperimentConfig, node_config: dict) -> ExperimentConfig:
    """The device's own DP minimum, so it need not trust the server's run config.

    A SuperNode started with ``--node-config 'dp-clip-norm=1.0 dp-noise-multiplier=1.1'`` clips to at most
    that norm and adds at least that noise multiplier, and never uses seeded noise, whatever the server
    asked. Only stricter: the server's ``privacy.epsilon`` stays a valid upper bound for such devices.
    """
    import dataclasses

    clip, z = node_config.get("dp-clip-norm"), node_config.get("dp-noise-multiplier")
    if clip is None and z is None:
        return cfg
    d = cfg.dp
    new_clip = min(float(clip), d.clip_norm) if clip is not None and d.clip_norm > 0 else float(clip or d.clip_norm)
    new_z = max(float(z), d.noise_multiplier) if z is not None else d.noise_multiplier
    if new_clip <= 0 or new_z < 0:
        raise ValueError(f"node-config dp-clip-norm={clip!r} dp-noise-multiplier={z!r}: need clip > 0, noise >= 0")
    dp = dataclasses.replace(d, clip_norm=new_clip, noise_multiplier=new_z, seeded_noise=False)
    return dataclasses.replace(cfg, dp=dp)
