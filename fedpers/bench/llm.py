"""``P9_llm``: the LLM round of ``python -m fedpers.bench`` (``--only P9``; ``--llm-backbone`` names the model).

On the frozen causal LM (default ``smollm2-135m-instruct``) and the chitchat speakers, local LoRA training:

- ``ratio_vs_bare``: the fast engine's round time (round 2, caches warm) / a bare loop over the same
  clients' prepared rows: every local mini-batch's fwd+bwd of the target-token loss, then the test split's
  forward (target ``<= 1.25``);
- ``train_tokens_per_s``: tokens (context + reply, padding excluded) through fwd+bwd per second, bare and
  in the engine's round;
- ``adapter_from_layer``: bare fwd+bwd seconds per example, for LoRA and for soft prompts, with the adapter
  on every layer (prompts at the input) and from layer L up (LoRA on layers >= L, prompts entering layer
  L; the frozen layers below computed once per example and cached), L = half and four fifths of the depth;
- ``memory``: peak RSS of a child process holding the model, the federation of ``--llm-speakers`` speakers
  (default 200) and one full LoRA state per speaker, as the engine's state store holds them (target
  ``<= 3 GB``).

Ratios are measured within one run; read them with the machine's recorded load.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

LLM_BASE = ["model.modality=llm", "model.adapter=lora", "data.dataset=chitchat", "data.partitioner.name=natural_id",
            "data.partitioner.id_column=user", "data.max_train_per_client=32", "data.max_test_per_client=16",
            "model.llm.context_tokens=64", "model.llm.target_tokens=24", "model.llm.generations=0",
            "client.local_epochs=1", "client.batch_size=8", "client.optimizer=adamw", "client.lr=0.001",
            "strategy.name=local"]


def llm_overrides(backbone: str, clients: int) -> list[str]:
    return [*LLM_BASE, f"model.backbone={backbone}", f"run.num_clients={clients}", f"run.clients_per_round={clients}"]


def _tokens(batch) -> int:
    return int(batch.lengths.sum())


def bare_llm(cfg, pids: list[int], server_round: int = 2) -> dict[str, float]:
    """The engine's work for these clients in a tight loop: fwd+bwd of each local mini-batch (the
    engine's batch sizes; no optimizer, no bookkeeping), then the test split's forward."""
    from fedpers.client import lm_scores, make_context, steps_per_epoch

    train = test = 0.0
    tokens = 0
    for pid in pids:
        ctx = make_context(cfg, pid, server_round)
        m = ctx.model
        tensors = {k: v.clone().requires_grad_(True) for k, v in m.read_tensors().items()}
        rows = m.prepare(ctx.data.x_train)
        b = cfg.client.batch_size
        t0 = time.perf_counter()
        for _ in range(cfg.client.local_epochs):
            for i in range(steps_per_epoch(ctx)):
                part = rows.select(torch.arange(i * b, min((i + 1) * b, len(rows))))
                m.lm_loss(part, tensors).backward()
                tokens += _tokens(part)
        t1 = time.perf_counter()
        lm_scores(ctx, {k: v.detach() for k, v in tensors.items()})
        train += t1 - t0
        test += time.perf_counter() - t1
    return {"train_fwd_bwd_s": train, "test_fwd_s": test, "train_tokens": tokens}


def per_example_fwd_bwd(cfg, from_layer: int, reps: int = 3, adapter: str = "lora") -> float:
    """Seconds per example of one mini-batch's fwd+bwd with the adapter from ``from_layer`` (0 = all
    layers), the frozen layers below cached (warm: the first pass fills the cache and is not timed)."""
    import copy

    from fedpers.client import make_context

    cfg = copy.deepcopy(cfg)
    cfg.model.adapter = adapter
    cfg.model.llm.lora_from_layer = 0
    cfg.model.llm.adapter_from_layer = from_layer
    ctx = make_context(cfg, 0, 1)
    m = ctx.model
    tensors = {k: v.clone().requires_grad_(True) for k, v in m.read_tensors().items()}
    part = m.prepare(ctx.data.x_train).select(torch.arange(min(cfg.client.batch_size, ctx.data.num_train)))
    m.lm_loss(part, tensors).backward()  # warm-up (fills the frozen-layer cache)
    t0 = time.perf_counter()
    for _ in range(reps):
        m.lm_loss(part, tensors).backward()
    return (time.perf_counter() - t0) / reps / len(part)


def p9_llm(quick: bool, tmp: Path, backbone: str, speakers: int) -> dict:
    from fedpers.bench.support import cfg_of, fast_rounds

    clients = 2 if quick else 4
    base = llm_overrides(backbone, clients)
    rows = fast_rounds(base, tmp / "p9", 2)
    last = rows[-1]
    cfg = cfg_of(["run.engine=fast", *base, "run.rounds=2"], tmp / "p9")
    bare = bare_llm(cfg, last["sampled"])
    bare_all = bare["train_fwd_bwd_s"] + bare["test_fwd_s"]
    depth = _depth(cfg)
    split = {}
    starts = sorted({depth // 2, max(1, 4 * depth // 5)})  # the top half, the top fifth (L=24 of 30)
    for adapter in ("lora", "prompt"):
        full = per_example_fwd_bwd(cfg, 0, adapter=adapter)
        upper = {str(L): per_example_fwd_bwd(cfg, L, adapter=adapter) for L in starts}
        split[adapter] = {"all_layers_s_per_example": full, "from_layer_s_per_example": upper,
                          "speedup": {L: full / t for L, t in upper.items()}}
    memory = memory_of(backbone, speakers if not quick else 8)
    return {
        "ratio_vs_bare": last["round_time_s"] / bare_all, "target": "<= 1.25",
        "engine_round_s": last["round_time_s"], "bare_train_fwd_bwd_s": bare["train_fwd_bwd_s"],
        "bare_test_fwd_s": bare["test_fwd_s"], "train_tokens": bare["train_tokens"],
        "train_tokens_per_s_bare": bare["train_tokens"] / bare["train_fwd_bwd_s"],
        "train_tokens_per_s_engine_round": bare["train_tokens"] / last["round_time_s"],
        "adapter_from_layer": {"layers": depth, **split},
        "memory": memory, "memory_target": "peak_rss_mb <= 3072",
        "config": base, "clients": clients,
    }


def _depth(cfg) -> int:
    from fedpers.client import client_setup

    return int(client_setup(cfg).model.base.config.get_text_config().num_hidden_layers)


def memory_of(backbone: str, speakers: int) -> dict:
    """Peak RSS of a child process holding the model, the federation and one LoRA state per speaker."""
    from fedpers.bench import support as bs

    return bs.run_child(["--llm-memory-child", backbone, str(speakers)])


def memory_child(backbone: str, speakers: int) -> dict:
    """Entry of ``--llm-memory-child``: the model, ``speakers`` speakers' data and their LoRA states."""
    from fedpers.bench.support import read_proc_status
    from fedpers.client import client_setup
    from fedpers.data import build_federated
    from fedpers.experiment import build, load_config

    start = read_proc_status()["rss_mb"]
    cfg = load_config(None, llm_overrides(backbone, speakers) + ["run.output_dir=/tmp/fedpers-bench-llm-mem"])
    shapes = build(cfg).shapes
    client_setup(cfg)
    model_mb = read_proc_status()["rss_mb"]
    build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    data_mb = read_proc_status()["rss_mb"]
    # The engine's state store: {partition id: {name: float32 array}}; filled with non-zero values so
    # every page is really resident.
    states = {pid: {k: np.full(s, 0.01, dtype=np.float32) for k, s in shapes.items()} for pid in range(speakers)}
    status = read_proc_status()
    per_state = sum(int(np.prod(s)) * 4 for s in shapes.values())
    return {"speakers": speakers, "rss_start_mb": start, "rss_with_model_mb": model_mb,
            "rss_with_data_mb": data_mb, "rss_with_states_mb": status["rss_mb"], "peak_rss_mb": status["peak_rss_mb"],
            "lora_state_mb_per_speaker": per_state / 2**20, "states_held": len(states)}

