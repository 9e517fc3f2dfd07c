"""One client's round: (frozen backbone, personal state, received tensors, its data) -> reply + new state.

Engine-agnostic: the Flower ClientApp and the in-process engine both call :func:`client_round`. The
client trains its prompts and its private linear head with SGD; it returns only the deltas of the
tensors the server sent, and keeps its head (and, for some strategies, its prompts) in ``state``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedpers.config import ExperimentConfig
from fedpers.data import ClientData, build_federated, get_dataset_info
from fedpers.dp import privatize_reply
from fedpers.models.prompted import backbone_from_config
from fedpers.payload import DTYPE, Reply
from strategies import get_strategy_class


def seed_for(*parts: int) -> int:
    """A torch seed derived from (seed, round, partition-id, ...), stable across processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _initial_prompts(cfg: ExperimentConfig, pid: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_for(cfg.run.seed, pid, 0x9A))
    return torch.randn(cfg.model.num_prompts, dim, generator=g) * cfg.model.prompt_init_std


def client_round(
    cfg: ExperimentConfig,
    partition_id: int,
    server_round: int,
    received: dict[str, np.ndarray],
    state: dict[str, np.ndarray],
    data: ClientData | None = None,
) -> tuple[Reply, dict[str, np.ndarray]]:
    """``data``: the device's own data (deployment); None = this partition of the simulated federation."""
    strategy = get_strategy_class(cfg.strategy.name)
    if data is None:
        fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
        if not 0 <= partition_id < len(fed.clients):
            raise ValueError(f"partition-id {partition_id} outside [0, {len(fed.clients)})")
        data = fed.clients[partition_id]
    num_classes = get_dataset_info(cfg.data.dataset).num_classes
    model = backbone_from_config(cfg.model)
    dim = model.embed_dim

    if "prompts" in received:
        start = torch.from_numpy(np.array(received["prompts"], dtype=DTYPE))
    elif "prompts" in state:
        start = torch.from_numpy(np.array(state["prompts"], dtype=DTYPE))
    else:
        start = _initial_prompts(cfg, partition_id, dim)
    if tuple(start.shape) != (cfg.model.num_prompts, dim):
        raise ValueError(f"prompts have shape {tuple(start.shape)}, expected {(cfg.model.num_prompts, dim)}")
    prompts = start.clone().requires_grad_(True)
    if "head.weight" in state:
        w = torch.from_numpy(np.array(state["head.weight"], dtype=DTYPE))
        b = torch.from_numpy(np.array(state["head.bias"], dtype=DTYPE))
    else:  # a zero head starts every client from the same, unbiased point
        w, b = torch.zeros(num_classes, dim), torch.zeros(num_classes)
    w.requires_grad_(True)
    b.requires_grad_(True)

    c = cfg.client
    opt = torch.optim.SGD([prompts, w, b], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    g = torch.Generator().manual_seed(seed_for(cfg.run.seed, server_round, partition_id))
    x_train = model.prepare(data.x_train)
    n = data.num_train
    losses = []
    for _ in range(c.local_epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, c.batch_size):
            idx = order[i : i + c.batch_size]
            logits = F.linear(model.features(model.embed(x_train[idx]), prompts), w, b)
            loss = F.cross_entropy(logits, data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())

    with torch.no_grad():
        logits = F.linear(model(data.x_test, prompts), w, b)
        test_loss = float(F.cross_entropy(logits, data.y_test))
        test_acc = float((logits.argmax(1) == data.y_test).float().mean())

    trained = {"prompts": prompts.detach(), "head": None}
    arrays = {
        f"delta/{k}": (trained[k] - torch.from_numpy(np.asarray(received[k], dtype=DTYPE))).numpy().astype(DTYPE)
        for k in strategy.sends
    }
    arrays = privatize_reply(cfg, arrays, server_round, partition_id)  # identity unless dp.clip_norm > 0
    new_state = {"head.weight": w.detach().numpy().copy(), "head.bias": b.detach().numpy().copy()}
    if "prompts" in strategy.personal:
        new_state["prompts"] = prompts.detach().numpy().copy()
    steps_per_epoch = max(1, -(-n // c.batch_size))
    metrics = {
        "train_loss": float(np.mean(losses[-steps_per_epoch:])),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "num_test": float(len(data.y_test)),
    }
    return Reply(partition_id, arrays, n, metrics), new_state
