"""``python -m fedpers.export_partitions OUT_DIR [--config FILE] [key=value ...]``

Write each simulated client's data to ``OUT_DIR/client_<partition-id>/`` (a ``datasets.DatasetDict``
with ``train`` and ``test`` splits, saved with ``save_to_disk``), so a deployment can be rehearsed on
real devices with exactly the data the simulation uses: copy one folder to each device and start its
SuperNode with ``--node-config 'partition-id=<id> data-path=<folder>'``. The partitioning is the one
the config describes (``data.*``, ``run.num_clients``, ``run.seed``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpers.config import ConfigError

from fedpers.experiment import load_config


def export(cfg, out_dir: str | Path) -> list[Path]:
    from datasets import Dataset, DatasetDict

    from fedpers.data import build_federated

    fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pid, c in enumerate(fed.clients):
        dd = DatasetDict({
            "train": Dataset.from_dict({"image": c.x_train.numpy(), "label": c.y_train.numpy()}),
            "test": Dataset.from_dict({"image": c.x_test.numpy(), "label": c.y_test.numpy()}),
        })
        folder = out / f"client_{pid}"
        dd.save_to_disk(str(folder))
        written.append(folder)
    (out / "partitions.json").write_text(json.dumps({
        "dataset": cfg.data.dataset, "num_clients": cfg.run.num_clients, "seed": cfg.run.seed,
        "partitioner": cfg.data.partitioner.name,
        "clients": {str(i): {"train": c.num_train, "test": len(c.y_test)} for i, c in enumerate(fed.clients)},
    }, indent=2))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpers.export_partitions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder to write client_<id>/ folders into")
    ap.add_argument("--config", help="YAML config file (same as python -m fedpers.simulate)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import datasets

    from fedpers.data import DataError

    datasets.disable_progress_bars()  # one line per client folder is the useful output
    try:
        folders = export(cfg, args.out_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in folders:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
