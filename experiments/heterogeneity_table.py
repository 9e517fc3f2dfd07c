"""Heterogeneity vs personalization: each scheme's JS/EMD and each strategy's final personalized accuracy.

    python experiments/heterogeneity_table.py --rounds 20 --seeds 0 1 2          # the full table (hours on 2 cores)
    python experiments/heterogeneity_table.py --rounds 5 --seeds 0 1 2 --schemes iid dirichlet_0.1 domain concept

Runs the in-process engine on the default config (digits, 10 clients, vit_fedpers_digits) with only the
scheme's overrides changed, skips runs whose summary.json exists (so it can be resumed), and writes
table.csv and table.md (mean +- std over seeds) into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

SCHEMES = {
    "iid": ["data.partitioner.name=iid"],
    "dirichlet_10": ["data.partitioner.name=dirichlet", "data.partitioner.alpha=10"],
    "dirichlet_0.1": ["data.partitioner.name=dirichlet", "data.partitioner.alpha=0.1"],
    "pathological_2": ["data.partitioner.name=pathological", "data.partitioner.num_classes_per_partition=2"],
    "square": ["data.partitioner.name=square", "data.small_client_policy=rebalance", "data.min_client_size=10"],
    "domain": ["data.partitioner.name=iid", "data.shift.name=domain"],
    "concept": ["data.partitioner.name=iid", "data.shift.name=concept"],
    # Label permutations are invisible to strategies whose heads are private and start at zero (training is
    # equivariant to relabelling); merging different classes on different clients changes each client's task.
    "concept_group": ["data.partitioner.name=iid", "data.shift.name=concept", "data.shift.concept_mode=group",
                      "data.shift.num_label_groups=5"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--strategies", nargs="+", default=["pfedpg", "fedvpt", "local"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="results/heterogeneity_table")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    args = ap.parse_args(argv)

    from fedpers import simulate

    out = Path(args.out)
    rows = []
    for scheme in args.schemes:
        for strategy in args.strategies:
            for seed in args.seeds:
                run_dir = out / scheme / f"{strategy}-s{seed}"
                if not (run_dir / "summary.json").is_file():
                    # run.overwrite: an unfinished folder here is this script's own, to redo.
                    code = simulate.main(["run.engine=inprocess", "run.progress=false", "run.overwrite=true",
                                          f"run.rounds={args.rounds}",
                                          f"run.seed={seed}", f"strategy.name={strategy}", f"run.output_dir={run_dir}",
                                          *SCHEMES[scheme], *args.overrides])
                    if code != 0:
                        print(f"run failed: {run_dir}", file=sys.stderr)
                        return code
                summary = json.loads((run_dir / "summary.json").read_text())
                het = json.loads((run_dir / "partitions" / "heterogeneity.json").read_text())
                rows.append({"scheme": scheme, "strategy": strategy, "seed": seed, "js": het["js_mean"],
                             "emd": het["emd_mean"], "label_disagreement": het.get("label_disagreement", 0.0),
                             "accuracy": summary["final"]["accuracy_mean"],
                             "worst10": summary["final"]["accuracy_worst10"]})
    out.mkdir(parents=True, exist_ok=True)
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| scheme | JS | EMD | " + " | ".join(args.strategies) + " |",
             "|---|---|---|" + "---|" * len(args.strategies)]
    for scheme in args.schemes:
        mine = [r for r in rows if r["scheme"] == scheme]
        cells = []
        for strategy in args.strategies:
            acc = [r["accuracy"] for r in mine if r["strategy"] == strategy]
            cells.append(f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc):.1f}")
        lines.append(f"| {scheme} | {np.mean([r['js'] for r in mine]):.3f} | {np.mean([r['emd'] for r in mine]):.3f} | "
                     + " | ".join(cells) + " |")
    note = f"\nFinal personalized test accuracy (%), mean ± std over seeds {args.seeds}, {args.rounds} rounds.\n"
    (out / "table.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
