"""Cross-evaluation (``run.cross_eval``): every trained client's personal model on every client's test split.

How personal is a personal model? After the last round the server runs two extra exchanges through the
run's own transport (the fast engine or Flower's Grid, the same messages either way):

1. *upload*: each trained client sends the model it evaluated itself with in its last round (every
   client tensor the forward pass reads: adapter, head, and whatever the strategy mixes in), which the
   client kept aside for this purpose (``STASH`` keys in its state, only while ``run.cross_eval`` is on);
2. *evaluate*: every client (held-out ones included) receives all those models and scores each on its
   own test split with the strategy's own evaluator (``Strategy.evaluate_model``).

Data never moves; models do, which is why this is a simulation diagnostic, off by default, and why
replies here skip ``dp.*`` noise (they are not training updates). The diagonal is each client's own
accuracy; ``gap = own_mean - others_mean`` says how much better a model does at home than elsewhere.
``run.cross_eval_clients=N`` scores N trained clients' models on those N clients only (N x N: the gap
from a seeded sample, for runs where every model on every client costs too much, e.g. an LLM on a CPU).
Outputs: ``cross_eval.csv`` (model_client, data_client, accuracy, loss, num_test), ``cross_eval.png``
(heatmap) and ``final.cross_eval.{own_mean, others_mean, gap, num_models}`` in ``summary.json``.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np

from fedpers.client import CROSS_EVAL_STASH as STASH  # the client keeps its model under these keys
from fedpers.payload import DTYPE, Reply

log = logging.getLogger("fedpers")

CONTROL = "cross_eval/op"  # payload key marking a cross-evaluation message (never a client tensor name)
MODEL = "model/"  # evaluate payload: model/<partition id>/<tensor name>
UPLOAD, EVALUATE = 1.0, 2.0


def is_control(payloads: dict[int, dict[str, np.ndarray]]) -> bool:
    return any(CONTROL in a for a in payloads.values())


def client_op(ctx, strategy_cls, received: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> Reply:
    """Answer one cross-evaluation message; the client's state is not changed."""
    import torch

    op = float(np.asarray(received[CONTROL]).ravel()[0])
    n = ctx.data.num_train
    if op == UPLOAD:
        model = {k[len(STASH):]: v for k, v in state.items() if k.startswith(STASH)}
        if not model:
            raise ValueError("no personal model to upload: this client never trained with run.cross_eval on")
        return Reply(ctx.partition_id, model, n, {})
    if op != EVALUATE:
        raise ValueError(f"unknown cross-evaluation operation {op}")
    models: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in received.items():
        if k.startswith(MODEL):
            pid, name = k[len(MODEL):].split("/", 1)
            models.setdefault(int(pid), {})[name] = torch.from_numpy(np.array(v, dtype=DTYPE))
    metrics = {"num_test": float(len(ctx.data.y_test))}
    for pid, tensors in sorted(models.items()):
        loss, acc = strategy_cls.evaluate_model(ctx, tensors)
        metrics[f"accuracy/{pid}"], metrics[f"loss/{pid}"] = float(acc), float(loss)
    return Reply(ctx.partition_id, {}, n, metrics)


def sample_clients(seed: int, trained: list[int], n: int) -> list[int]:
    """``run.cross_eval_clients``: ``n`` of the clients that trained (all of them if fewer), drawn once by
    the run's seed (a stream of its own: the round sampling is not moved), in partition order."""
    if len(trained) <= n:
        return sorted(trained)
    rng = np.random.default_rng([int(seed), _SAMPLE_STREAM])
    return sorted(int(p) for p in rng.choice(sorted(trained), size=n, replace=False))


_SAMPLE_STREAM = 0xC505


def run(cfg, transport, train_ids: list[int], server_round: int, data_ids: list[int] | None = None) -> dict:
    """The two exchanges; returns {"matrix": {(model, data): (acc, loss, n)}, "failures": [...]}. The
    models of ``train_ids`` are scored on the test splits of ``data_ids`` (None: every client)."""

    r = cfg.run
    max_bytes = int(r.max_upload_mb * 1024 * 1024)
    failures = []
    up = transport.exchange(server_round, {p: {CONTROL: np.array([UPLOAD], dtype=DTYPE)} for p in train_ids},
                            r.client_timeout_s)
    models = {}
    for pid in train_ids:
        reply = up.get(pid)
        reason = _upload_problem(reply, pid, max_bytes)
        if reason:
            failures.append({"stage": "upload", "partition_id": pid, "reason": reason})
        else:
            models[pid] = reply.arrays
    if not models:
        log.warning("cross-evaluation: no client uploaded a model")
        return {"matrix": {}, "failures": failures}
    payload = {f"{MODEL}{pid}/{k}": v for pid, m in models.items() for k, v in m.items()}
    payload[CONTROL] = np.array([EVALUATE], dtype=DTYPE)
    everyone = list(range(r.num_clients)) if data_ids is None else list(data_ids)
    back = transport.exchange(server_round + 1, {p: payload for p in everyone}, r.client_timeout_s)
    matrix = {}
    for pid in everyone:
        reply = back.get(pid)
        if not isinstance(reply, Reply):
            failures.append({"stage": "evaluate", "partition_id": pid,
                             "reason": getattr(reply, "reason", "no reply")})
            continue
        for m in models:
            acc, loss = reply.metrics.get(f"accuracy/{m}"), reply.metrics.get(f"loss/{m}")
            ok = isinstance(acc, float) and 0.0 <= acc <= 1.0 and isinstance(loss, float) and math.isfinite(loss)
            if not ok:
                failures.append({"stage": "evaluate", "partition_id": pid, "reason": f"bad metrics for model {m}"})
                continue
            matrix[(m, pid)] = (acc, loss, int(reply.metrics.get("num_test", 0)))
    return {"matrix": matrix, "failures": failures}


def _upload_problem(reply, pid: int, max_bytes: int) -> str:
    from fedpers.payload import serialized_nbytes

    if not isinstance(reply, Reply):
        return getattr(reply, "reason", "no reply")
    if not reply.arrays:
        return "empty model"
    if serialized_nbytes(reply.arrays) > max_bytes:
        return f"model exceeds run.max_upload_mb ({max_bytes} bytes)"
    for k, v in reply.arrays.items():
        if not isinstance(v, np.ndarray) or v.dtype != DTYPE or not np.isfinite(v).all():
            return f"{k}: not a finite float32 array"
    return ""


def summarize(result: dict, llm: bool = False) -> dict:
    """own_mean: mean over models of their home accuracy; others_mean: mean over models of their mean
    accuracy on the other clients' splits (each model counts once); gap = own - others. ``llm``: also
    the same in perplexity (own_perplexity, others_perplexity, perplexity_gap = others - own)."""
    matrix = result["matrix"]
    owners = sorted({m for m, _ in matrix})
    own = [matrix[(m, m)][0] for m in owners if (m, m) in matrix]
    others = []
    for m in owners:
        v = [acc for (mm, d), (acc, _, _) in matrix.items() if mm == m and d != m]
        if v:
            others.append(float(np.mean(v)))
    own_mean = float(np.mean(own)) if own else None
    others_mean = float(np.mean(others)) if others else None
    gap = own_mean - others_mean if own_mean is not None and others_mean is not None else None
    # The same in perplexity (exp of each cell's loss: for a causal LM the mean NLL per reply token), where
    # a personal model's advantage at home is others - own (lower is better).
    own_ppl = [math.exp(matrix[(m, m)][1]) for m in owners if (m, m) in matrix]
    others_ppl = []
    for m in owners:
        v = [math.exp(loss) for (mm, d), (_, loss, _) in matrix.items() if mm == m and d != m]
        if v:
            others_ppl.append(float(np.mean(v)))
    ppl = {}
    if llm and own_ppl and others_ppl:
        ppl = {"own_perplexity": float(np.mean(own_ppl)), "others_perplexity": float(np.mean(others_ppl)),
               "perplexity_gap": float(np.mean(others_ppl)) - float(np.mean(own_ppl))}
    return {"own_mean": own_mean, "others_mean": others_mean, "gap": gap, "num_models": len(owners),
            "failures": result["failures"], **ppl}


def write(result: dict, out: Path, title: str = "") -> None:
    matrix = result["matrix"]
    with (out / "cross_eval.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model_client", "data_client", "accuracy", "loss", "num_test"])
        for (m, d), (acc, loss, n) in sorted(matrix.items()):
            w.writerow([m, d, f"{acc:.6f}", f"{loss:.6f}", n])
    if not matrix:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in matrix})
    data = sorted({d for _, d in matrix})
    grid = np.full((len(models), len(data)), np.nan)
    for (m, d), (acc, _, _) in matrix.items():
        grid[models.index(m), data.index(d)] = acc
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(data), 1.0 + 0.35 * len(models)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(data)), [str(d) for d in data], fontsize=6)
    ax.set_yticks(range(len(models)), [str(m) for m in models], fontsize=6)
    ax.set_xlabel("test split of client")
    ax.set_ylabel("personal model of client")
    ax.set_title(f"cross-evaluation accuracy {title}".strip(), fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "cross_eval.png", dpi=120)
    plt.close(fig)
