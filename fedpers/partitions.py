"""``python -m fedpers.partitions [--config FILE] [--out DIR] [key=value ...]``: inspect a config's federation.

Builds the clients exactly as a simulation would (same config fields, same seed) and writes per-client
label histograms and sizes (label_counts.csv, partitions.json), the heterogeneity summary
(heterogeneity.json) and plots (label_distribution.png, label_heatmap.png, domains.png under domain shift).

It writes to a folder of its own (``results/partitions`` unless ``--out``) and refuses a folder that
belongs to a simulation run, so a preview never replaces the record of a finished run; files of an
earlier report that this one does not write (plots after ``--no-plots``) are removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpers.config import ConfigError

from fedpers.experiment import load_config
from fedpers.docs import describe_fields

DEFAULT_OUT = "results/partitions"
# A folder holding any of these (or whose parent does) is a simulation's results folder.
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "config.yaml")


def run_folder_of(out: Path) -> Path | None:
    """The simulation results folder ``out`` is, or is the partitions/ folder of; None if neither.
    ``out`` is resolved first: ``RUN/partitions/x/..`` (with no ``x`` yet) or a symlink to
    ``RUN/partitions`` is that folder, whatever its spelling."""
    out = Path(out).resolve()
    for d in (out, out.parent):
        if any((d / f).exists() for f in RUN_FILES):
            return d
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fedpers.partitions",
        description="Write label histograms, sizes, heterogeneity numbers and plots of a config's partition.\n"
        "Example: python -m fedpers.partitions data.partitioner.name=dirichlet data.partitioner.alpha=0.3\n\n"
        "Fields (name, type, default, meaning):\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML config file (see experiments/configs/)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"output folder of its own (default: {DEFAULT_OUT}); never a simulation's results folder")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    owner = run_folder_of(out)  # before any work: building the data may take a while
    if owner is not None:
        print(f"error: --out {out}: {owner} holds a simulation run (its {', '.join(f for f in RUN_FILES if (owner / f).exists())});"
              " choose a folder of its own", file=sys.stderr)
        return 2
    from fedpers.data import DataError, build_federated
    from fedpers.data.stats import describe_setting, write_report

    try:
        fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = write_report(fed, out, describe_setting(cfg.data, cfg.run.seed), plots=not args.no_plots)
    het = {k: (round(v, 4) if isinstance(v, float) else v)
           for k, v in rep["heterogeneity"].items() if not k.startswith("per_client")}
    print(json.dumps({"partitioner": cfg.data.partitioner.name, "shift": cfg.data.shift.name,
                      "sizes": [a + b for a, b in zip(rep["num_train"], rep["num_test"])],
                      "heterogeneity": het, "output": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
