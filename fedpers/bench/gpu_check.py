"""``python -m fedpers.gpu_check [--device cuda] [--output FILE] [--quick]``: the GPU path in one command.

Three parts, each in a child process with its own time limit, so one that hangs or fails still leaves
the others' figures; the JSON is rewritten after every part:

1. ``tests``: the CUDA tests (``tests/test_cuda.py``, skipped on a machine without CUDA) with
   ``FEDPERS_TEST_DEVICE`` set to the device: batched training on the device equals one-client-at-a-
   time training on the CPU, the frozen backbone's device copy, a real-size ViT-B/16 step.
2. ``bench``: ``python -m fedpers.bench --device DEVICE --only P1,P3`` (P1 runs on the CPU: the fast
   engine's per-client path; P3 compares the batched trainer on the device with it).
3. ``vit_b16_round``: one pFedPG round of 50 clients on timm's ``vit_base_patch16_224`` (random init:
   this measures speed, not accuracy) at 224 px on digits (50 clients, about 21 train images each), batched on the device: round time, client updates
   per second and peak device memory; plus the same round's first two clients trained on the CPU, to
   report how far the device's numbers are from the CPU's (TF32 convolutions make them differ slightly).

Meant for a lent GPU machine that has torch, timm, transformers and peft but not Flower: nothing here
imports Flower (``scripts/gpu_check.sh`` installs the few other packages from carried wheels).
On a machine without CUDA every part still runs with ``--device cpu`` (slowly), which is how it is
tested. Never a pass/fail timing test: it records numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "bench", "vit_b16_round")


def _child(args: list[str], timeout_s: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                           env={**os.environ, **(env or {})})
        out = {"rc": p.returncode, "tail": (p.stdout + p.stderr)[-3000:]}
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"") + (e.stderr or b"")) if isinstance(e.stdout, bytes) else ""
        out = {"rc": None, "timed_out_after_s": timeout_s, "tail": tail.decode(errors="replace")[-3000:] if tail else ""}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def part_tests(device: str, timeout_s: float) -> dict:
    res = _child([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                 timeout_s, {"FEDPERS_TEST_DEVICE": device})
    last = [ln for ln in res["tail"].splitlines() if " in " in ln and ("passed" in ln or "failed" in ln
                                                                       or "skipped" in ln)]
    res["summary"] = last[-1].strip("= ") if last else None
    return res


def part_bench(device: str, quick: bool, timeout_s: float, tmp: Path) -> dict:
    out_file = tmp / "bench.json"
    args = [sys.executable, "-m", "fedpers.bench", "--device", device, "--only", "P1,P3", "--output", str(out_file)]
    res = _child(args + (["--quick"] if quick else []), timeout_s)
    if out_file.exists():  # written after every part, so a timed-out run still has its first figures
        res["result"] = json.loads(out_file.read_text())
    res.pop("tail") if res.get("rc") == 0 else None
    return res


def vit_b16_overrides(device: str, clients: int, out: Path, backbone: str = "vit_base_patch16_224:224") -> list[str]:
    """50 clients of digits (about 21 train / 6 test images each), ``clients`` of them sampled;
    ``backbone`` = ``timm_name:img_size``. Batches of 8 for 2 epochs: about 6 steps, so the prompts
    get gradients once the zero-initialised head has moved (with one step they would only decay)."""
    name, size = backbone.split(":")
    return ["strategy.name=pfedpg", "run.engine=fast", "run.batch_clients=true", f"run.device={device}",
            f"model.backbone={name}", "model.pretrained=false", f"model.img_size={size}",
            "run.num_clients=50", f"run.clients_per_round={clients}", "run.rounds=1",
            "data.partitioner.name=iid", "client.local_epochs=2", "client.batch_size=8", "run.progress=false",
            "run.checkpoint_every=0", f"run.output_dir={out}"]


def vit_b16_round(device: str, quick: bool, backbone: str) -> dict:
    """Runs in a child process (``--vit-child``): one batched round on the device, then the first two
    clients of the same round on the CPU for the agreement figure."""
    import numpy as np
    import torch

    from fedpers.client import make_context
    from fedpers.experiment import load_config
    from fedpers.rounds import batched
    from fedpers.rounds.engine import InProcessTransport
    from fedpers.rounds.server import build_strategy

    tmp = Path(tempfile.mkdtemp(prefix="fedpers-gpu-check-"))
    clients = 50 if not quick else 4
    cfg = load_config(None, vit_b16_overrides(device, clients, tmp / "dev", backbone))
    strategy = build_strategy(cfg)
    pids = list(range(clients))
    payloads = strategy.configure(1, pids)
    transport = InProcessTransport(cfg)
    transport.exchange(1, {p: payloads[p] for p in pids[:2]}, 600.0)  # warm-up: caches, device copy, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    transport = InProcessTransport(cfg)
    t0 = time.perf_counter()
    replies = transport.exchange(1, payloads, 600.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    round_s = time.perf_counter() - t0
    failed = [p for p, r in replies.items() if not hasattr(r, "arrays")]
    ok = [r for r in replies.values() if hasattr(r, "arrays")]
    out = {"clients": clients, "failed": failed, "round_s": round(round_s, 3),
           "client_updates_per_s": round(len(ok) / round_s, 2),
           "train_samples": int(sum(r.num_examples for r in ok)),
           "mean_test_accuracy_random_init": float(np.mean([r.metrics["test_accuracy"] for r in ok])) if ok else None,
           "params_sent_per_client": int(sum(v.size for v in payloads[0].values())),
           "peak_device_mem_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                  if device.startswith("cuda") else None),
           "overrides": vit_b16_overrides(device, clients, Path("OUT"), backbone)}
    # The same two clients' deltas computed on the CPU: relative difference of the device's deltas.
    cpu_cfg = load_config(None, vit_b16_overrides("cpu", clients, tmp / "cpu", backbone))
    ctxs = [make_context(cpu_cfg, p, 1) for p in pids[:2]]
    t0 = time.perf_counter()
    cpu = batched.train_group(type(strategy), ctxs, [payloads[p] for p in pids[:2]], [{}, {}], "cpu")
    out["cpu_two_clients_s"] = round(time.perf_counter() - t0, 2)
    rel = {}
    for p, (reply, state) in zip(pids[:2], cpu):
        dev = {**replies[p].arrays, **transport.states[p]}
        for k, v in {**reply.arrays, **state}.items():
            rel[f"{p}/{k}"] = float(np.linalg.norm(dev[k] - v) / max(np.linalg.norm(v), 1e-12))
    out["rel_diff_vs_cpu"] = rel  # sent deltas and personal heads of the first two clients
    out["rel_diff_vs_cpu_max"] = max(rel.values())
    # With gradients reaching them the prompts' deltas are not a multiple of the prompts (weight decay alone).
    d, p0 = replies[0].arrays["delta/prompts"].ravel(), payloads[0]["prompts"].ravel()
    cos = float(d @ p0 / (np.linalg.norm(d) * np.linalg.norm(p0) + 1e-12))
    out["prompt_delta_cosine_to_prompts"] = cos
    # Share of the delta's norm orthogonal to the prompts: ~1e-7 (float rounding) under weight decay alone,
    # clearly above that once gradients reach the prompts. Unlike the cosine itself, this does not depend
    # on how far a few steps from a random head happen to move them.
    d64, p64 = d.astype(np.float64), p0.astype(np.float64)
    resid = d64 - (d64 @ p64) / max(p64 @ p64, 1e-300) * p64
    out["prompt_delta_orthogonal_fraction"] = float(np.linalg.norm(resid) / max(np.linalg.norm(d64), 1e-300))
    out["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpers.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device: cuda | cuda:N | cpu (default: cuda)")
    ap.add_argument("--output", help="JSON file to write (default: print only)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (4 clients in the ViT-B/16 round, bench --quick): to test the script itself")
    ap.add_argument("--parts", default="tests,bench,vit_b16_round", help="comma-separated parts to run")
    ap.add_argument("--timeout-s", type=float, default=150.0, help="time limit of each part, in seconds")
    ap.add_argument("--backbone", default="vit_base_patch16_224:224",
                    help="timm_name:img_size of the vit_b16_round part (default vit_base_patch16_224:224)")
    ap.add_argument("--vit-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vit_child:
        print("VIT_RESULT " + json.dumps(vit_b16_round(args.device, args.quick, args.backbone)))
        return 0
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: --parts: unknown part {unknown[0]!r}; allowed: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    from fedpers.bench.support import machine

    result: dict = {"machine": machine(), "device": args.device, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="fedpers-gpu-check-") as d:
        for name in parts:
            if name == "tests":
                result[name] = part_tests(args.device, args.timeout_s)
            elif name == "bench":
                result[name] = part_bench(args.device, args.quick, args.timeout_s, Path(d))
            else:
                res = _child([sys.executable, "-m", "fedpers.gpu_check", "--vit-child", "--device", args.device,
                              "--backbone", args.backbone]
                             + (["--quick"] if args.quick else []), args.timeout_s)
                line = [ln for ln in res.get("tail", "").splitlines() if ln.startswith("VIT_RESULT ")]
                if line:
                    res.update(json.loads(line[-1][len("VIT_RESULT "):]))
                    res.pop("tail")
                result[name] = res
            print(f"{name}: done in {result[name].get('seconds')} s", file=sys.stderr, flush=True)
            if args.output:
                Path(args.output).write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = json.dumps(result, indent=2, default=float)
    print(text)
    failed = [n for n in parts if result[n].get("rc") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
