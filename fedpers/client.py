"""One client's round: (frozen backbone, personal state, received tensors, its data) -> reply + new state.

Engine-agnostic: the Flower ClientApp and the in-process engine both call
:func:`fedpers.rounds.client_round.client_round`, which hands these blocks to the client's strategy.

A client holds named tensors: the backbone's trainable tensors (``prompts`` for a prompted ViT) and
its linear head (``head.weight``, ``head.bias``). Each round it starts every tensor from what the
server sent, else from its personal state, else from a seeded initialisation; trains; and returns
only ``delta/<name>`` = trained - received for the tensors it was sent. The strategy decides what is
sent and what is kept (``Strategy.sends`` / ``Strategy.personal``) and may change the local objective
by overriding ``Strategy.client_update``; the building blocks it needs live here (a causal LM's
mini-batch loss, scoring and generations in :mod:`fedpers.client_llm`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fedpers.client_llm import lm_batch_loss, lm_scores, write_generations
from fedpers.config import ExperimentConfig
from fedpers.data import ClientData, build_federated, get_dataset_info
from fedpers.models import cache
from fedpers.models.backbones import adapter_shapes, load_model
from fedpers.models.prompted import backbone_from_config
from fedpers.payload import DTYPE, Reply


def seed_for(*parts: int) -> int:
    """A torch seed derived from (seed, round, partition-id, ...), stable across processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


BACKBONE = "backbone."  # prefix of backbone weights as client tensors (strategies with trains_backbone)


def client_tensor_shapes(cfg: ExperimentConfig, num_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a client trains, by name: the backbone's adapter tensors, the linear head and, for
    some strategies, more. The server derives what it sends from this.

    Adapter tensors are ``prompts`` (K, D) for visual or soft text prompts and prefixes, or peft's LoRA
    factors by name; a strategy with ``deep_prompts`` trains ``deep_prompts``
    (depth, K, D) instead; one with ``trains_backbone`` also trains every backbone weight as
    ``backbone.<timm parameter name>``."""
    from fedpers.models.prompted import backbone_depth

    # What the strategy trains is declared on its config class (copied there by register_strategy), so
    # the client blocks need no strategy lookup.
    k = cfg.model.num_prompts
    if getattr(cfg.strategy, "deep_prompts", False):
        shapes = {"deep_prompts": (backbone_depth(cfg.model.backbone), k, dim)}
    else:
        shapes = dict(adapter_shapes(cfg.model, dim))
    if cfg.model.modality != "llm":  # an LLM's personal part is its adapter: no classification head
        shapes.update({"head.weight": (num_classes, dim), "head.bias": (num_classes,)})
    if getattr(cfg.strategy, "trains_backbone", False):
        shapes.update({k: tuple(v.shape) for k, v in backbone_tensors(cfg).items()})
    return shapes


def backbone_tensors(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The pretrained backbone's weights named as client tensors (read-only views; copy before use)."""
    model = backbone_from_config(cfg.model)
    return {BACKBONE + k: v.detach() for k, v in model.vit.named_parameters()}


@dataclass
class ClientContext:
    """Everything a client's local update may use. Built once per (client, round)."""

    cfg: ExperimentConfig
    partition_id: int
    server_round: int
    data: ClientData
    model: torch.nn.Module
    num_classes: int

    def generator(self, *salt: int) -> torch.Generator:
        """A generator private to this (seed, round, client[, salt])."""
        return torch.Generator().manual_seed(seed_for(self.cfg.run.seed, self.server_round, self.partition_id, *salt))

    tensor_shapes: dict[str, tuple[int, ...]] | None = None  # from ClientSetup; computed when absent
    # the strategy's evaluator (Strategy.evaluate_model), set by the round dispatcher: finish() scores the
    # validation split with it, as the strategy scores test; None = the one-forward-pass `evaluate`
    scorer: Callable[[ClientContext, dict[str, torch.Tensor]], tuple[float, float]] | None = None

    def validation(self) -> ClientContext:
        """This context with the validation split in the test split's place (``ClientData.validation_view``)."""
        return replace(self, data=self.data.validation_view())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.tensor_shapes is None:
            return client_tensor_shapes(self.cfg, self.num_classes, self.model.embed_dim)
        return self.tensor_shapes


@dataclass(frozen=True)
class ClientSetup:
    """What every client of a run shares, built once per process from a validated config: the frozen
    backbone, the number of classes and every client tensor's shape. The server's strategy is sized
    from the same ``shapes`` (:func:`fedpers.experiment.build`), so the two sides cannot disagree."""

    model: torch.nn.Module
    num_classes: int
    shapes: dict[str, tuple[int, ...]]


def run_tensor_shapes(cfg: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Every client tensor's shape for this run: the one place the server (which sizes its strategy from
    it, without loading a ViT's weights) and the clients (:func:`client_setup`) read them from."""
    from fedpers.models.backbones import feature_dim

    num_classes = get_dataset_info(cfg.data.dataset).num_classes
    return client_tensor_shapes(cfg, num_classes, feature_dim(cfg.model))


def _setup_key(cfg: ExperimentConfig) -> str:
    import json
    from dataclasses import asdict

    flags = {f: bool(getattr(cfg.strategy, f, False)) for f in ("deep_prompts", "trains_backbone")}
    return json.dumps({"model": asdict(cfg.model), "dataset": cfg.data.dataset, **flags}, sort_keys=True)


_SETUPS: dict[str, ClientSetup] = {}


def client_setup(cfg: ExperimentConfig) -> ClientSetup:
    """Built once per process and model configuration (the backbone itself is cached by its loader)."""
    key = _setup_key(cfg)
    hit = _SETUPS.get(key)
    if hit is None:
        hit = ClientSetup(load_model(cfg.model), get_dataset_info(cfg.data.dataset).num_classes, run_tensor_shapes(cfg))
        if len(_SETUPS) >= 4:  # a sweep in one process walks through configs; keep the last few
            _SETUPS.pop(next(iter(_SETUPS)))
        _SETUPS[key] = hit
    return hit


def make_context(cfg: ExperimentConfig, partition_id: int, server_round: int,
                 data: ClientData | None = None) -> ClientContext:
    """``data``: the device's own data (deployment); None = this partition of the simulated federation."""
    if data is None:
        fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
        if not 0 <= partition_id < len(fed.clients):
            raise ValueError(f"partition-id {partition_id} outside [0, {len(fed.clients)})")
        data = fed.clients[partition_id]
    s = client_setup(cfg)
    if cfg.model.modality == "llm":  # the frozen LLM runs on run.device (client tensors stay on the CPU)
        s.model.place(cfg.run.device, cfg.run.cache_mb if cfg.run.cache else 0.0)
    return ClientContext(cfg, partition_id, server_round, data, s.model, s.num_classes, s.shapes)


def initial_tensor(ctx: ClientContext, name: str) -> torch.Tensor:
    """Seeded by (seed, partition-id) only, so a client starts from the same point in every round."""
    shape = ctx.shapes[name]
    if name.startswith(BACKBONE):
        return backbone_tensors(ctx.cfg)[name].clone()
    if name == "prompts" and ctx.cfg.model.modality == "llm":
        # peft's own initialisation (soft prompts: embeddings of sampled vocabulary tokens): random
        # N(0, std) vectors are far larger than an LM's token embeddings and wreck the frozen model
        return ctx.model.read_tensors()["prompts"].clone()
    if name in ("prompts", "deep_prompts"):
        g = torch.Generator().manual_seed(seed_for(ctx.cfg.run.seed, ctx.partition_id, 0x9A))
        return torch.randn(*shape, generator=g) * ctx.cfg.model.prompt_init_std
    if ".lora_" in name:
        from fedpers.models.text import init_lora_tensor

        return init_lora_tensor(name, shape, torch.Generator().manual_seed(seed_for(ctx.cfg.run.seed, ctx.partition_id, 0x10)))
    return torch.zeros(*shape)  # a zero head starts every client from the same, unbiased point


def start_tensors(ctx: ClientContext, received: dict[str, np.ndarray],
                  state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Received > personal state > initialisation, for every client tensor; shapes checked."""
    out = {}
    for name, shape in ctx.shapes.items():
        src = received.get(name, state.get(name))
        t = initial_tensor(ctx, name) if src is None else torch.from_numpy(np.array(src, dtype=DTYPE))
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        out[name] = t.clone()
    return out


def client_prompts(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors["deep_prompts"] if "deep_prompts" in tensors else tensors["prompts"]


def _weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"vit." + k[len(BACKBONE):]: v for k, v in tensors.items() if k.startswith(BACKBONE)}


def head_logits(feats: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(feats, tensors["head.weight"], tensors["head.bias"])


def logits(ctx: ClientContext, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Prepared inputs (``model.prepare``) -> class logits under the client tensors ``tensors``."""
    weights = _weights(tensors)
    if weights:  # the backbone itself is trained: run it with these weights in place of the frozen ones
        feats = torch.func.functional_call(ctx.model, weights, (x, client_prompts(tensors)), {"prepared": True})
    else:
        feats = ctx.model.features_with(ctx.model.embed(x), tensors)
    return head_logits(feats, tensors)



def token_logits(ctx: ClientContext, tokens: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embedded tokens (``model.embed``) -> logits; only while the backbone's weights are frozen."""
    return head_logits(ctx.model.features_with(tokens, tensors), tensors)


def cacheable(tensors: dict[str, torch.Tensor]) -> bool:
    """Frozen computation may be cached only while no backbone weight is a client tensor (fedavg_full)."""
    return not _weights(tensors)


def non_head_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The client tensors the backbone reads (everything but the head)."""
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


def batch_tokens(ctx: ClientContext, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``idx -> tokens of x[idx]``: from the process cache (run.cache), else embedded per batch."""
    cached = cache.tokens(ctx.cfg.run, ctx.model, x)
    if cached is not None:
        return lambda idx: cached[idx]
    prepared = ctx.model.prepare(x)
    return lambda idx: ctx.model.embed(prepared[idx])


def frozen_features(ctx: ClientContext, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Features of every row of ``x`` under the current backbone tensors, from the process cache
    (None when run.cache is off). Only valid while those tensors are not being trained."""
    return cache.frozen_features(ctx.cfg.run, ctx.model, x, non_head_tensors(tensors),
                                 lambda t: ctx.model.features_with(t, tensors))


def steps_per_epoch(ctx: ClientContext) -> int:
    return max(1, -(-ctx.data.num_train // ctx.cfg.client.batch_size))


def local_budget(ctx: ClientContext) -> int:
    """The local compute every strategy gets per round, in optimizer steps on one mini-batch:
    ``client.local_epochs`` passes over the client's training split. Two-phase strategies (FedRep,
    Ditto, APFL) split this count between their phases instead of running each phase for full epochs."""
    return ctx.cfg.client.local_epochs * steps_per_epoch(ctx)


def split_budget(ctx: ClientContext, first_fraction: float) -> tuple[int, int]:
    """``local_budget`` split into two phases, each at least one step."""
    total = local_budget(ctx)
    first = min(max(1, round(total * first_fraction)), max(1, total - 1))
    return first, max(1, total - first)


def batch_indices(ctx: ClientContext, steps: int, salt: int = 0):
    """``steps`` mini-batch index tensors, drawn as :func:`fit` draws them (seeded passes over the data)."""
    g = ctx.generator(*((salt,) if salt else ()))
    n, b = ctx.data.num_train, ctx.cfg.client.batch_size
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, b):
            if done == steps:
                return
            done += 1
            yield order[i : i + b]


def local_optimizer(params, c) -> torch.optim.Optimizer:
    """The client's local optimizer (``client.optimizer``), new every round: FL clients do not keep
    optimizer state between rounds."""
    if c.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)


def fit(
    ctx: ClientContext,
    tensors: dict[str, torch.Tensor],
    trainable: Iterable[str],
    epochs: int | None,
    extra_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    salt: int = 0,
    view: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    steps: int | None = None,
) -> list[float]:
    """``client.optimizer`` on ``trainable`` tensors (in place) for ``epochs`` passes, or exactly ``steps`` mini-batch
    steps (``epochs=None``; passes continue with a fresh order until the count is reached); returns
    per-step losses, one per optimizer step.

    ``extra_loss`` adds a term to every step's loss (e.g. a proximal term). ``view`` maps ``tensors``
    to the client tensors the model runs with (e.g. APFL's mixture of personal and global tensors)."""
    c = ctx.cfg.client
    if (epochs is None) == (steps is None):
        raise ValueError("fit: give exactly one of epochs and steps")
    limit = steps if steps is not None else epochs * steps_per_epoch(ctx)
    names = [n for n in trainable]
    for n in names:
        tensors[n].requires_grad_(True)
    opt = local_optimizer([tensors[n] for n in names], c)
    g = ctx.generator(*((salt,) if salt else ()))
    data = ctx.data
    batch_loss = (lm_batch_loss(ctx) if ctx.model.modality == "llm"
                  else _classification_batch_loss(ctx, tensors, names, view))
    n, b = data.num_train, c.batch_size
    losses: list[float] = []
    while len(losses) < limit:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, b):
            if len(losses) == limit:
                break
            loss = batch_loss(order[i : i + b], view(tensors) if view is not None else tensors)
            if extra_loss is not None:
                loss = loss + extra_loss(tensors)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    for n in names:
        tensors[n] = tensors[n].detach()
    return losses


def _classification_batch_loss(ctx: ClientContext, tensors: dict[str, torch.Tensor], names: list[str],
                               view) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """Cross-entropy of the head's logits on a mini-batch, through the exact frozen caches where they apply."""
    data = ctx.data
    frozen = cacheable(tensors)
    tokens = batch_tokens(ctx, data.x_train) if frozen else None
    x_train = None if frozen else ctx.model.prepare(data.x_train)
    # Head-only training: the backbone's output is fixed, so compute it once (exact; see fedpers.models.cache).
    head_only = frozen and view is None and not any(k in names for k in non_head_tensors(tensors))
    feats = frozen_features(ctx, data.x_train, tensors) if head_only else None

    def loss(idx: torch.Tensor, used: dict[str, torch.Tensor]) -> torch.Tensor:
        if feats is not None:
            out = head_logits(feats[idx], used)
        elif tokens is not None:
            out = token_logits(ctx, tokens(idx), used)
        else:
            out = logits(ctx, x_train[idx], used)
        return F.cross_entropy(out, data.y_train[idx])

    return loss


@torch.no_grad()
def evaluate(ctx: ClientContext, tensors: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(loss, accuracy) of the client's model on its own test split. For a causal LM: the mean NLL of
    the reply tokens (perplexity = exp) and the next-token accuracy, both token-weighted."""
    if ctx.model.modality == "llm":
        loss, acc, _ = lm_scores(ctx, tensors)
        return loss, acc
    if not cacheable(tensors):
        out = logits(ctx, ctx.model.prepare(ctx.data.x_test), tensors)
    else:
        feats = frozen_features(ctx, ctx.data.x_test, tensors)
        if feats is None:
            feats = ctx.model.features_with(ctx.model.embed(ctx.model.prepare(ctx.data.x_test)), tensors)
        out = head_logits(feats, tensors)
    loss = float(F.cross_entropy(out, ctx.data.y_test))
    acc = float((out.argmax(1) == ctx.data.y_test).float().mean())
    return loss, acc


def finish(ctx: ClientContext, sends: Iterable[str], personal: Iterable[str], received: dict[str, np.ndarray],
           trained: dict[str, torch.Tensor], losses: list[float],
           eval_tensors: dict[str, torch.Tensor] | None = None,
           eval_result: tuple[float, float] | None = None, local_steps: int | None = None,
           extra_metrics: dict[str, float] | None = None,
           val_result: tuple[float, float] | None = None,
           generate: Callable[[list], list[str]] | None = None) -> tuple[Reply, dict[str, np.ndarray]]:
    """Deltas of the sent tensors, the new personal state, and metrics (evaluated on ``eval_tensors``,
    default ``trained``; or given as ``eval_result`` = (loss, accuracy) by a batched evaluator).
    ``local_steps``: optimizer steps this round (default: one per loss in ``losses``), reported so that
    tables can show every strategy's local compute next to its accuracy. ``generate``: examples -> greedy
    replies, for a strategy whose causal LM is not one forward pass under ``eval_tensors``."""
    arrays = {
        f"delta/{k}": (trained[k].detach() - torch.from_numpy(np.asarray(received[k], dtype=DTYPE)))
        .numpy().astype(DTYPE)
        for k in sends
    }
    state = {k: trained[k].detach().numpy().astype(DTYPE).copy() for k in personal}
    model = eval_tensors if eval_tensors is not None else trained
    test_loss, test_acc = eval_result or evaluate(ctx, model)
    if ctx.cfg.run.cross_eval:  # the model just evaluated, kept for the cross-evaluation after training
        stash_for_cross_eval(state, eval_tensors if eval_tensors is not None else trained)
    if ctx.model.modality == "llm":
        write_generations(ctx, eval_tensors if eval_tensors is not None else trained, generate=generate)
    per_epoch = steps_per_epoch(ctx)
    metrics = {
        "train_loss": float(np.mean(losses[-per_epoch:])) if losses else float("nan"),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "num_test": float(len(ctx.data.y_test)),
        "local_steps": float(len(losses) if local_steps is None else local_steps),
        **validation_metrics(ctx, model, val_result),
        **(extra_metrics or {}),
    }
    return Reply(ctx.partition_id, arrays, ctx.data.num_train, metrics), state


def validation_metrics(ctx: ClientContext, tensors: dict[str, torch.Tensor],
                       result: tuple[float, float] | None = None) -> dict[str, float]:
    """``val_loss``, ``val_accuracy`` and ``num_val`` of the evaluated model on the client's validation
    split (data.val_fraction), scored by the strategy's own evaluator; {} when there is none. ``result``:
    already computed by a batched evaluator."""
    if not ctx.data.has_validation:
        return {}
    loss, acc = result if result is not None else (ctx.scorer or evaluate)(ctx.validation(), tensors)
    return {"val_loss": float(loss), "val_accuracy": float(acc), "num_val": float(len(ctx.data.y_val))}


CROSS_EVAL_STASH = "cross_eval/"  # state prefix of the model a client last evaluated itself with


def stash_for_cross_eval(state: dict[str, np.ndarray], model: dict) -> None:
    """Keep the tensors a client just evaluated itself with, for the cross-evaluation's upload exchange
    (:mod:`fedpers.results.cross_eval`)."""
    for k, v in model.items():
        state[CROSS_EVAL_STASH + k] = np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, dtype=DTYPE).copy()


def default_client_update(strategy_cls, ctx: ClientContext, received: dict[str, np.ndarray],
                          state: dict[str, np.ndarray]) -> tuple[Reply, dict[str, np.ndarray]]:
    """Train every client tensor jointly for the local budget; reply with deltas of sent ones."""
    tensors = start_tensors(ctx, received, state)
    losses = fit(ctx, tensors, list(tensors), None, steps=local_budget(ctx))
    sends, personal = strategy_cls.tensor_roles(ctx.shapes)
    return finish(ctx, sends, personal, received, tensors, losses)
