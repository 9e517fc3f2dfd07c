"""``python -m fedpers.bench.poison [--config FILE] [key=value ...]``: one client poisons every round with a
valid delta just under ``run.max_delta_norm`` (the ``poison`` fault of :mod:`fedpers.rounds.faults`), under
each robust aggregation rule of the averaging strategies, next to the same federation without the attack.

Every variant runs the config on the fast engine (default: ``experiments/configs/tiny.yaml`` with
``strategy.name=fedavg``) into ``<out>/<variant>/`` and prints a Markdown table: final mean accuracy and the
L2 norm of the global tensors at the end (all of them together).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VARIANTS = {
    "no attack": {},
    "attack, mean": {},
    "attack, median": {"strategy.robust_aggregation": "median"},
    "attack, trimmed_mean (0.2)": {"strategy.robust_aggregation": "trimmed_mean", "strategy.trim_fraction": 0.2},
    "attack, norm_bound_relative=2": {"strategy.norm_bound_relative": 2.0},
}


def run_variant(config: str, overrides: list[str], out: Path, attacker: int | None) -> tuple[dict, float]:
    """(summary, global tensors' norm) of one run; ``attacker`` poisons every round (None: nobody)."""
    import numpy as np

    from fedpers import simulate
    from fedpers.results import run_folder
    from fedpers.experiment import load_config
    from fedpers.rounds.engine import InProcessTransport
    from fedpers.rounds.faults import FaultyTransport
    from fedpers.rounds.server import build_strategy, run_server

    cfg = load_config(config, [*overrides, f"run.output_dir={out}", "run.engine=fast", "run.progress=false"])
    run_folder.check(cfg, overwrite=True)
    Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
    simulate.preflight(cfg)
    strategy = build_strategy(cfg)
    inner = InProcessTransport(cfg)
    try:
        faults = {} if attacker is None else {(attacker, None): "poison"}
        summary = run_server(cfg, FaultyTransport(inner, faults), strategy)
    finally:
        inner.close()
    g = strategy.state_dict()["global"]
    return summary, float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in g.values())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fedpers.bench.poison", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="experiments/configs/tiny.yaml")
    ap.add_argument("--out", default="results/poison", help="results folder (one subfolder per variant)")
    ap.add_argument("--attacker", type=int, default=0, help="partition id of the poisoning client")
    ap.add_argument("overrides", nargs="*", help="key=value fields for every variant (default strategy: fedavg)")
    args = ap.parse_intermixed_args(argv)
    from fedpers.config import ConfigError

    base = ["strategy.name=fedavg", *args.overrides]
    lines = [
        "| variant | final accuracy (mean over clients) | global tensors' L2 norm | rounds applied |",
        "|---|---|---|---|",
    ]
    for i, (name, extra) in enumerate(VARIANTS.items()):
        try:
            summary, norm = run_variant(
                args.config,
                [*base, *(f"{k}={v}" for k, v in extra.items())],
                Path(args.out) / f"v{i}",
                None if i == 0 else args.attacker,
            )
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        lines.append(
            f"| {name} | {summary['final']['accuracy_mean']:.3f} | {norm:.3g} | "
            f"{summary['rounds_applied']}/{summary['rounds']} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    (Path(args.out) / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
