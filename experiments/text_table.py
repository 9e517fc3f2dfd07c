"""Strategies x {prompt, prefix, LoRA} on the offline default text task (experiments/configs/text_default.yaml).

    python experiments/text_table.py --seeds 0 1 2 --jobs 3 [--rounds 6] [--out results/text_table]

Each run is a separate ``python -m fedpers.simulate`` process writing its own results folder; the
table (markdown + CSV) aggregates mean / worst-10% personalized accuracy over seeds, trainable and
communicated (up + down) parameters per client per round, and seconds per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "text_default.yaml"
GRID = [
    ("prompt", "local"), ("prompt", "fedvpt"), ("prompt", "pfedpg"),
    ("prefix", "local"), ("prefix", "fedvpt"),
    ("lora", "local"), ("lora", "fedit"), ("lora", "fedprox_lora"), ("lora", "ffa_lora"), ("lora", "fedsa_lora"),
    ("lora", "hetlora"), ("lora", "pfedlora_gen"),
]


def run_one(adapter: str, strategy: str, seed: int, rounds: int, out: Path) -> Path:
    folder = out / f"{adapter}-{strategy}-s{seed}"
    if (folder / "summary.json").is_file():
        return folder
    # run.overwrite: an unfinished folder here is this script's own, to redo.
    cmd = [sys.executable, "-m", "fedpers.simulate", "--config", str(CONFIG), "run.progress=false", "run.overwrite=true",
           f"run.rounds={rounds}", f"run.seed={seed}", f"run.output_dir={folder}", f"model.adapter={adapter}",
           f"strategy.name={strategy}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FLWR_TELEMETRY_ENABLED": "0"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{folder.name} failed ({res.returncode}): {res.stderr[-2000:]}")
    return folder


def param_counts(folder: Path) -> tuple[float, float]:
    """(trainable, communicated up+down) parameters per client per round, averaged over clients."""
    from fedpers.experiment import from_yaml
    from fedpers.rounds.server import build_strategy

    cfg = from_yaml((folder / "config.yaml").read_text())
    s = build_strategy(cfg)
    frozen = set()
    if cfg.strategy.name == "ffa_lora":
        frozen = {k for k in s.shapes if k.endswith("lora_A.weight")}
    trainable, comm = [], []
    for pid in range(cfg.run.num_clients):
        shapes = s.client_shapes(pid)
        trainable.append(sum(int(np.prod(v)) for k, v in shapes.items() if k not in frozen))
        comm.append(2 * sum(int(np.prod(shapes[k])) for k in s.sends))
    return float(np.mean(trainable)), float(np.mean(comm))


def summarize(out: Path, seeds: list[int]) -> str:
    rows = ["| adapter | strategy | seeds | mean acc | worst-10% acc | trainable / client | communicated / client / round | s / round |",
            "|---|---|---|---|---|---|---|---|"]
    csv = ["adapter,strategy,seeds,acc_mean,acc_mean_std,acc_worst10,trainable,communicated,s_per_round"]
    for adapter, strategy in GRID:
        folders = [out / f"{adapter}-{strategy}-s{s}" for s in seeds]
        folders = [f for f in folders if (f / "summary.json").is_file()]
        if not folders:
            continue
        sums = [json.loads((f / "summary.json").read_text()) for f in folders]
        acc = [s["final"]["accuracy_mean"] for s in sums]
        worst = [s["final"]["accuracy_worst10"] for s in sums]
        secs = [np.mean([json.loads(line)["round_time_s"] for line in (f / "metrics.jsonl").read_text().splitlines()])
                for f in folders]
        trainable, comm = param_counts(folders[0])
        rows.append(f"| {adapter} | {strategy} | {len(folders)} | {np.mean(acc):.3f} ± {np.std(acc):.3f} | "
                    f"{np.mean(worst):.3f} | {trainable:,.0f} | {comm:,.0f} | {np.mean(secs):.1f} |")
        csv.append(f"{adapter},{strategy},{len(folders)},{np.mean(acc):.4f},{np.std(acc):.4f},{np.mean(worst):.4f},"
                   f"{trainable:.0f},{comm:.0f},{np.mean(secs):.2f}")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    (out / "table.csv").write_text("\n".join(csv) + "\n")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each is single-threaded)")
    ap.add_argument("--out", default=str(ROOT / "results" / "text_table"))
    ap.add_argument("--only", nargs="*", help="adapter-strategy pairs to run, e.g. lora-fedit")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [g for g in GRID if not args.only or f"{g[0]}-{g[1]}" in args.only]
    jobs = [(a, s, seed) for seed in args.seeds for a, s in grid]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, a, s, seed, args.rounds, out) for a, s, seed in jobs]
        for f in futures:
            try:
                print("done", f.result().name, flush=True)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
    print(summarize(out, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
