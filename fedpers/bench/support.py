"""Helpers of ``python -m fedpers.bench``: machine facts, RSS from /proc, child-process runs, the
synthetic data and micro backbone of the memory benchmark, and its child entry point.

Benchmarks print ratios measured within one run; they are never pass/fail timing tests.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MICRO_BACKBONE = "vit_fedpers_bench_micro"


def read_proc_status() -> dict[str, float]:
    """Current and peak resident set size of this process, in MB (Linux /proc; no psutil)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024.0  # kB -> MB
    return {"rss_mb": out.get("VmRSS", float("nan")), "peak_rss_mb": out.get("VmHWM", float("nan"))}


def load_average() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                            cwd=Path(__file__).parent).stdout.strip() or os.environ.get("FEDPERS_COMMIT")
    return {
        "commit": commit,
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "uptime_at_start": uptime,
        "load_average_at_start": load_average(),
    }


def child_env() -> dict[str, str]:
    """Offline, telemetry-free environment with a private HOME/FLWR_HOME for child runs."""
    home = tempfile.mkdtemp(prefix="fedpers-bench-home-")
    env = dict(os.environ)
    env.update({
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HOME": home, "FLWR_HOME": os.path.join(home, ".flwr"), "MPLBACKEND": "Agg",
    })
    return env


def run_simulate(overrides: list[str], out_dir: Path, timeout_s: float = 1800.0) -> dict:
    """``python -m fedpers.simulate`` in a child process: wall time and per-round times from its results."""
    args = [sys.executable, "-m", "fedpers.simulate", *overrides, f"run.output_dir={out_dir}", "run.progress=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=timeout_s, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "round_s": [r["round_time_s"] for r in rows],
            "client_updates": sum(r["num_ok"] for r in rows), "summary": json.loads((out_dir / "summary.json").read_text())}


def run_child(module_args: list[str], timeout_s: float = 1800.0) -> dict:
    """``python -m fedpers.bench <module_args>`` in a child; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", "fedpers.bench", *module_args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {module_args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def register_synthetic(num_images: int) -> str:
    """A class-conditional 8x8 image dataset of ``num_images`` (prototype + noise), registered in this
    process only: the memory benchmark needs ~20 samples for each of 1,000 clients (digits has 1,348)."""
    from fedpers.data.catalog import list_datasets
    from fedpers.data.datasets import _to_hf, make_synthetic_images
    from fedpers.data.registry import register_dataset

    name = f"bench_synthetic_{num_images}"
    if name in list_datasets():
        return name

    @register_dataset(name, num_classes=10, image_shape=(1, 8, 8), description="benchmark-only synthetic images")
    def load(path=None):
        return _to_hf(*make_synthetic_images(num_images))

    return name


def register_micro_backbone() -> str:
    """A 1-block, 32-wide random ViT: memory of the engine, not of a model, is what P4 measures."""
    import timm
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(MICRO_BACKBONE):
        @register_model
        def vit_fedpers_bench_micro(pretrained: bool = False, **kwargs):
            args = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2,
                    "mlp_ratio": 2.0}
            # Without this, timm's default (ImageNet, 3-channel) normalisation would be used.
            overlay = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "num_classes": 0}
            kwargs["pretrained_cfg_overlay"] = {**overlay, **(kwargs.get("pretrained_cfg_overlay") or {})}
            return build_model_with_cfg(VisionTransformer, MICRO_BACKBONE, pretrained, **dict(args, **kwargs))
    return MICRO_BACKBONE


def memory_child(num_clients: int, rounds: int) -> dict:
    """Entry of ``fedpers.bench.core --memory-child N R``: a fast-engine run of N clients x R rounds (all
    clients every round) on synthetic data (~20 samples per client) with the micro backbone; RSS after
    every round from /proc."""
    from fedpers.experiment import load_config
    from fedpers.rounds.engine import InProcessTransport
    from fedpers.rounds.server import run_server

    dataset = register_synthetic(20 * num_clients)
    backbone = register_micro_backbone()
    out = tempfile.mkdtemp(prefix="fedpers-bench-mem-")
    cfg = load_config(None, [
        f"data.dataset={dataset}", "data.partitioner.name=iid", f"model.backbone={backbone}",
        "model.pretrained=false", "model.num_prompts=4", f"run.num_clients={num_clients}",
        f"run.clients_per_round={num_clients}", f"run.rounds={rounds}", "run.engine=fast", "run.progress=false",
        f"run.output_dir={out}", "client.local_epochs=1", "strategy.name=fedvpt",
    ])
    before = read_proc_status()["rss_mb"]
    per_round: list[float] = []

    trimmed: list[float] = []

    class Recording(InProcessTransport):
        def exchange(self, server_round, payloads, timeout):
            replies = super().exchange(server_round, payloads, timeout)
            per_round.append(read_proc_status()["rss_mb"])
            if malloc_trim():  # RSS once the C allocator has returned its free pages: memory in use
                trimmed.append(read_proc_status()["rss_mb"])
            return replies

    t0 = time.perf_counter()
    summary = run_server(cfg, Recording(cfg))
    wall = time.perf_counter() - t0
    if summary["failures"]:
        raise RuntimeError(f"memory benchmark: {summary['failures']} client updates failed (see the log)")
    status = read_proc_status()
    # Growth after the first round: round 1 fills the caches and the personal-state dict once.
    later = per_round[1:]
    growth = (later[-1] - later[0]) / (len(later) - 1) if len(later) > 1 else None
    growth_trimmed = (trimmed[-1] - trimmed[1]) / (len(trimmed) - 2) if len(trimmed) > 2 else None
    # The run keeps a per-round results history in memory (the rows of metrics.jsonl without the
    # per-client metrics, for the summary): that share of the growth is by design, the rest is the engine's.
    history = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    history = [{k: v for k, v in row.items() if k != "clients"} for row in history]
    history_mb = deep_sizeof(history[1:]) / 2**20 / max(1, len(history) - 1)
    return {"clients": num_clients, "rounds": rounds, "peak_rss_mb": status["peak_rss_mb"],
            "rss_before_run_mb": before, "rss_after_each_round_mb": [round(v, 2) for v in per_round],
            "growth_mb_per_round_after_round1": growth, "results_history_mb_per_round": history_mb,
            "growth_mb_per_round_without_history": None if growth is None else growth - history_mb,
            "rss_after_malloc_trim_mb": [round(v, 2) for v in trimmed],
            "growth_mb_per_round_after_malloc_trim": growth_trimmed,
            "wall_s": wall}


def malloc_trim() -> bool:
    """Ask glibc to return free heap pages to the OS (Linux); False where that is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def deep_sizeof(obj) -> int:
    """Bytes of a JSON-like object (dicts, lists, strings, numbers) and everything it holds."""
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_sizeof(k) + deep_sizeof(v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        size += sum(deep_sizeof(v) for v in obj)
    return size


def prompts_from_layer(model, layer: int):
    """A copy-free variant of a shallow-prompt ViT whose prompts enter at block ``layer`` instead of 0.

    Stands in for the deep-prompt models of the strategy zoo to show and measure the token cache's
    hook: ``embed`` returns everything below the first prompted layer (here ``blocks[:layer]``), so
    ``fedpers.models.cache`` keeps those activations with no change of its own."""
    from fedpers.models.prompted import PromptedViT

    class PromptedFromLayer(PromptedViT):
        def embed(self, x):
            with torch.no_grad():
                return self.vit.blocks[:layer](self.vit.norm_pre(super().embed(x)))

        def features_per_row(self, tokens, prompts):
            k, vit = self.num_prefix, self.vit
            x = vit.blocks[layer:](torch.cat([tokens[:, :k], prompts, tokens[:, k:]], dim=1))
            x = vit.norm(x)
            x = torch.cat([x[:, :k], x[:, k + prompts.shape[1] :]], dim=1)
            return vit.forward_head(x, pre_logits=True)

    return PromptedFromLayer(model.vit)


def cfg_of(overrides: list[str], out: Path):
    from fedpers.experiment import load_config

    return load_config(None, [*overrides, "run.progress=false", f"run.output_dir={out}"])


def fast_rounds(overrides: list[str], out: Path, rounds: int) -> list[dict]:
    """The metrics rows of a fast-engine run in this process (``round_time_s`` = server + clients)."""
    from fedpers.rounds.engine import InProcessTransport
    from fedpers.rounds.server import run_server

    cfg = cfg_of(["run.engine=fast", *overrides, f"run.rounds={rounds}"], out)
    run_server(cfg, InProcessTransport(cfg))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
