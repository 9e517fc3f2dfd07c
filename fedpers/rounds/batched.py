"""Batched multi-client local training (``run.batch_clients=true``, fast engine).

The clients of a round share one frozen backbone, so they can share its forward/backward passes: each
step takes every active client's next mini-batch (the very batch it would draw alone, from its own
seeded generator), runs them as one batch in which every row carries its own client's prompts (gathered
by client index) and head, and minimises the sum over clients of each client's own mean loss. A client's
tensors only touch its own rows, so its gradient is exactly what it gets alone; SGD with momentum and
weight decay is elementwise, so per-row updates over stacked tensors are per-client optimizers. A client
whose data runs out stops stepping (its rows are masked), as it would stop alone.

Only strategies with the default client objective (``Strategy.client_update`` not overridden) and
shallow prompts ``(K, D)`` are batched; the engine runs every other one client at a time. On a CPU a
batch of 32 already saturates the cores, so this gives ~1x there: it is meant for GPUs (``run.device``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from fedpers.models import cache
from fedpers.client import ClientContext, finish, start_tensors
from fedpers.payload import Reply
from strategies import Strategy

log = logging.getLogger("fedpers")

_DEVICE_MODELS: dict[tuple[int, str], tuple[torch.nn.Module, torch.nn.Module]] = {}


def supported(strategy_cls: type[Strategy], ctx: ClientContext) -> bool:
    """Default client objective, shallow prompts, and a model that takes one prompt set per row."""
    default = getattr(strategy_cls.client_update, "__func__", None) is Strategy.client_update.__func__
    shapes = ctx.shapes
    return (default and hasattr(ctx.model, "features_per_row") and len(shapes.get("prompts", ())) == 2
            and set(shapes) == {"prompts", "head.weight", "head.bias"})


def device_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The process's frozen backbone on ``device`` (a copy, made once; the CPU one is shared as is)."""
    if device == "cpu":
        return model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={device!r} but torch sees no CUDA device; use run.device=cpu")
    key = (id(model), device)
    if key not in _DEVICE_MODELS:
        import copy

        _DEVICE_MODELS[key] = (model, copy.deepcopy(model).to(device))  # holds the source so ids stay unique
    return _DEVICE_MODELS[key][1]


def group_clients(steps_sizes: list[int], max_samples: int) -> list[list[int]]:
    """Consecutive groups whose per-step samples add up to at most ``max_samples`` (at least one each)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(steps_sizes):
        if groups and total + size <= max_samples:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def schedule(ctx: ClientContext) -> list[torch.Tensor]:
    """The index batches ``client.fit`` draws for this client, in order (same generator, same calls)."""
    c = ctx.cfg.client
    g = ctx.generator()
    n = ctx.data.num_train
    out = []
    for _ in range(c.local_epochs):
        order = torch.randperm(n, generator=g)
        out.extend(order[i : i + c.batch_size] for i in range(0, n, c.batch_size))
    return out


def _tokens(ctx: ClientContext, x: torch.Tensor, device: str) -> torch.Tensor:
    t = cache.tokens(ctx.cfg.run, ctx.model, x)
    return (t if t is not None else cache.embed_all(ctx.model, x)).to(device)


def _gather(parts: list[tuple[int, torch.Tensor, torch.Tensor]], device: str):
    """[(client, tokens, labels)] -> one batch with the owner (client index) of every row."""
    owner = torch.cat([torch.full((len(y),), c, dtype=torch.long) for c, _, y in parts]).to(device)
    return torch.cat([t for _, t, _ in parts]), torch.cat([y for _, _, y in parts]), owner


def _logits(model, tok, owner, P, W, b):
    feats = model.features_per_row(tok, P[owner])
    return torch.einsum("nd,ncd->nc", feats, W[owner]) + b[owner]


def _sgd_rows(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, rows: torch.Tensor, c) -> None:
    """torch.optim.SGD (no nesterov, no dampening) on the given rows only, with the same op order."""
    g = grad[rows]
    if c.weight_decay:
        g = g.add(p[rows], alpha=c.weight_decay)
    if c.momentum:
        g = buf[rows].mul(c.momentum).add(g)  # buf starts at 0, so step 1 gives buf = g as torch does
        buf[rows] = g
    p[rows] = p[rows].add(g, alpha=-c.lr)


def train_group(strategy_cls: type[Strategy], ctxs: list[ClientContext], received: list[dict[str, np.ndarray]],
                states: list[dict[str, np.ndarray]], device: str) -> list[tuple[Reply, dict[str, np.ndarray]]]:
    """Local training + evaluation of several clients together; one (Reply, state) per client, in order."""
    c = ctxs[0].cfg.client
    model = device_model(ctxs[0].model, device)
    starts = [start_tensors(ctx, r, s) for ctx, r, s in zip(ctxs, received, states)]
    P, W, b = (torch.stack([t[k] for t in starts]).to(device).requires_grad_(True)
               for k in ("prompts", "head.weight", "head.bias"))
    bufs = [torch.zeros_like(t) for t in (P, W, b)]
    scheds = [schedule(ctx) for ctx in ctxs]
    toks = [_tokens(ctx, ctx.data.x_train, device) for ctx in ctxs]
    ys = [ctx.data.y_train.to(device) for ctx in ctxs]
    losses: list[list[float]] = [[] for _ in ctxs]
    for step in range(max(len(s) for s in scheds)):
        active = [i for i, s in enumerate(scheds) if step < len(s)]
        tok, y, owner = _gather([(i, toks[i][scheds[i][step]], ys[i][scheds[i][step]]) for i in active], device)
        counts = torch.zeros(len(ctxs), device=device).index_add_(0, owner, torch.ones_like(y, dtype=torch.float32))
        ce = F.cross_entropy(_logits(model, tok, owner, P, W, b), y, reduction="none")
        per_client = torch.zeros(len(ctxs), device=device).index_add_(0, owner, ce) / counts.clamp_min(1)
        grads = torch.autograd.grad(per_client.sum(), (P, W, b))
        rows = torch.tensor(active, device=device)
        with torch.no_grad():
            for p, g, buf in zip((P, W, b), grads, bufs):
                _sgd_rows(p, g, buf, rows, c)
        vals = per_client.detach().cpu().tolist()
        for i in active:
            losses[i].append(vals[i])
    P, W, b = (t.detach() for t in (P, W, b))
    evals = evaluate_group(ctxs, model, P, W, b, device)
    out = []
    for i, ctx in enumerate(ctxs):
        trained = {"prompts": P[i].cpu(), "head.weight": W[i].cpu(), "head.bias": b[i].cpu()}
        out.append(finish(ctx, strategy_cls.sends, strategy_cls.personal, received[i], trained, losses[i],
                          eval_result=evals[i]))
    return out


@torch.no_grad()
def evaluate_group(ctxs: list[ClientContext], model, P, W, b, device: str) -> list[tuple[float, float]]:
    """(loss, accuracy) of every client on its own test split, in mixed batches."""
    max_rows = ctxs[0].cfg.run.batch_max_samples
    tok, y, owner = _gather([(i, _tokens(ctx, ctx.data.x_test, device), ctx.data.y_test.to(device))
                             for i, ctx in enumerate(ctxs)], device)
    ce, hit = [], []
    for s in range(0, len(y), max_rows):
        out = _logits(model, tok[s : s + max_rows], owner[s : s + max_rows], P, W, b)
        ce.append(F.cross_entropy(out, y[s : s + max_rows], reduction="none"))
        hit.append((out.argmax(1) == y[s : s + max_rows]).float())
    n = torch.zeros(len(ctxs), device=device).index_add_(0, owner, torch.ones_like(y, dtype=torch.float32))
    loss = torch.zeros(len(ctxs), device=device).index_add_(0, owner, torch.cat(ce)) / n
    acc = torch.zeros(len(ctxs), device=device).index_add_(0, owner, torch.cat(hit)) / n
    return list(zip(loss.cpu().tolist(), acc.cpu().tolist()))
