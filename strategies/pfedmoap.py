"""pFedMoAP (Luo et al., ICLR 2025, "Mixture of Experts Made Personalized: Federated Prompt Learning for
Vision-Language Models", Sec. 3 / Algorithm 1), adapted from CLIP text prompts to our prompted backbone.

The round (official code: ljaiverson/pFedMoAP, ``federated_main.py`` 347-392): the server keeps every
client's latest uploaded prompt and their FedAvg ``P_glob``, weighted by the clients' data sizes
(``utils/fed_utils.py`` 5-28, called at ``federated_main.py`` 392; ``weighting=num_examples`` here). A
sampled client starts its local prompt from ``P_glob`` (375), downloads the latest prompts of other
clients as frozen non-local experts (370-371), and trains its prompt together with a local attention
gating network that never leaves it; it uploads only its prompt (384-387). A client seen for the first
time gets no experts and uses the local logits alone (362-374).

Which experts. The paper describes a KNN-based selection of the non-local prompts on the server (nearest
to the client's own prompt). The released code does not run it: ``sparse_selection(idx, ctxs, method="random")``
(``trainers/pfedmoap.py`` 321) is called without a method (``federated_main.py`` 370, 402), and the
``--sparse_selection`` flag (45, default ``nearest``) is never read, so it takes, from one list of all
clients shuffled once at start (``trainers/pfedmoap.py`` 296-297), the first ``NUM_EXPERTS - 1`` that have
uploaded a prompt and are not the client (322-329): a fixed random order, not a distance. Its
``NUM_EXPERTS`` counts the local expert (the ``- 1`` at 327 and 352; ``min(--num_experts, users)``,
default 10, ``federated_main.py`` 44, 144). This implementation: ``expert_selection=nearest`` (default,
the paper's rule) takes the ``num_experts`` other clients whose latest prompts are nearest (L2) to the
client's own latest prompt; ``expert_selection=random`` is the released code's rule (a seeded shuffle of
all partition ids fixed when the strategy is built; the first ``num_experts`` clients in it that have
uploaded and are not the client). Here ``num_experts`` counts only the non-local experts: the official
``NUM_EXPERTS = N`` is ``num_experts = N - 1``. The official loop trains the sampled clients one after
the other, so a later client of a round may get an expert uploaded earlier in the same round; here every
client of a round gets experts from the uploads of earlier rounds.

Prediction (the paper's final logits, as the official ``CustomCLIP.forward`` computes them,
``trainers/pfedmoap.py`` 217-237):

    logits = lambda * logits_local + logits_MoE

where the gate's query is the input's feature and its keys/values are the experts' outputs (its own
included), so the mixture weights are per input.

Adaptation to a prompted ViT / prompted text model with a personal linear head (CLIP's experts are
per-class text features; ours are prompt-conditioned input features, the classifier is the head):

    f_e(x) = backbone features of x under prompt e   (e = 0: own prompt, trainable; 1..K: experts, frozen)
    g(x)   = softmax_e( scaling * cos(f_0(x) W_q, f_e(x) W_k) )      (W_q, W_k: D x gate_dim, personal)
    logits = lambda * head(f_0(x)) + head( sum_e g_e(x) f_e(x) )

On a causal LM the experts are soft prompts scored through the frozen ``lm_head``; that client side (and
its departures from the CLIP setting) is in ``strategies/pfedmoap_llm.py``.

Simplified (named): one attention head with query/key projections only (the official code uses a
multi-head ``nn.MultiheadAttention`` on strided-pooled features), and values are the expert features
themselves so the personal head reads the mixture. Cost: K + 1 forward passes per batch. Experts are
broadcast (``experts``: K x prompt shape, ``expert_mask``: which slots hold a prompt) and not answered
for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedpers.errors import ConfigError
from strategies._avg import Averaging, AveragingConfig
from strategies._checks import require, require_choice
from strategies.base import HEAD, ClientUpdate, numel, register_strategy
from strategies.pfedmoap_llm import LLMMixture, gate

GATE = ("gate.q", "gate.k")
GATE_SALT = 0x6A7E


@dataclass
class PFedMoAPConfig(AveragingConfig):
    name: str = "pfedmoap"
    num_experts: int = 3  # K non-local experts per client (the official NUM_EXPERTS also counts the local one: K + 1)
    expert_selection: str = "nearest"  # nearest: the K other clients nearest (L2) to the client's latest prompt (the paper) | random: the first K uploaders in a seeded shuffle fixed at start (the released code)
    lmbda: float = 0.5  # weight of the local logits next to the mixture's (paper: lambda = 0.5)
    gate_dim: int = 32  # width of the gate's query/key projections
    scaling: float = 10.0  # temperature of the gate's cosine attention (official default 10)

    def validate(self) -> None:
        super().validate()
        require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        require_choice(self.expert_selection, "expert_selection", ("nearest", "random"))
        require(self.lmbda >= 0, "lmbda", f"must be >= 0, got {self.lmbda}")
        require(self.gate_dim >= 1, "gate_dim", f"must be >= 1, got {self.gate_dim}")
        require(self.scaling > 0, "scaling", f"must be > 0, got {self.scaling}")

    def validate_with(self, cfg) -> None:
        if cfg.model.modality == "llm" and cfg.model.adapter != "prompt":
            raise ConfigError("model.adapter", f"pfedmoap on model.modality=llm mixes soft-prompt experts; "
                                               f"allowed: prompt, not {cfg.model.adapter!r}")


def nearest(own: np.ndarray, pool: dict[int, np.ndarray], k: int) -> list[int]:
    """Up to ``k`` partition ids of ``pool`` nearest to ``own`` in L2 (ties by id)."""
    dist = sorted((float(np.sum((own.astype(np.float64) - p) ** 2)), pid) for pid, p in pool.items())
    return [pid for _, pid in dist[:k]]


def first_in_order(order: list[int], pool: dict[int, np.ndarray], pid: int, k: int) -> list[int]:
    """The first ``k`` ids of ``order`` that are in ``pool`` and are not ``pid`` (the official random
    selection, ``trainers/pfedmoap.py`` 322-329)."""
    return [p for p in order if p in pool and p != pid][:k]


def moe_logits(feats: list[torch.Tensor], mask: torch.Tensor, t: dict[str, torch.Tensor], lmbda: float, scaling: float,
               moe_weight: float = 1.0):
    """feats[0]: own features (N, D), feats[1..K]: experts'; mask (K,) marks real experts. ``lmbda * local +
    moe_weight * MoE`` (pFedMoAP: moe_weight 1; its convex variant: 1 - lmbda)."""
    local = F.linear(feats[0], t["head.weight"], t["head.bias"])
    if not bool(mask.any()):
        return local
    stack = torch.stack(feats, 1)  # (N, K+1, D)
    g = gate(feats[0], stack, mask, t, scaling)
    mixed = torch.einsum("ne,ned->nd", g, stack)
    return lmbda * local + moe_weight * F.linear(mixed, t["head.weight"], t["head.bias"])


@register_strategy
class PFedMoAP(LLMMixture, Averaging):
    name = "pfedmoap"
    modalities = ("vision", "text", "llm")
    summary = "FedAvg prompt start + K other clients' prompts (nearest, or the official code's random) as frozen experts, mixed by a local attention gate (pFedMoAP)"
    config_cls = PFedMoAPConfig
    sends = ("prompts",)
    personal = HEAD + GATE

    @classmethod
    def weights(cls, c) -> tuple[float, float]:
        """(local, mixture) weights of the final logits: the paper's ``lambda * logits_local + logits_MoE``
        (official ``CustomCLIP.forward``, ``trainers/pfedmoap.py`` 234)."""
        return float(c.lmbda), 1.0

    @classmethod
    def broadcast_shapes(cls, config, *, num_clients, shapes):
        k = int(config.num_experts)
        return {"experts": (k, *shapes["prompts"]), "expert_mask": (k,)}

    @classmethod
    def server_state_numel(cls, config, *, num_clients, shapes):
        """The global prompt, and every training client's latest uploaded prompt (its expert)."""
        own = super().server_state_numel(config, num_clients=num_clients, shapes=shapes)
        return own + num_clients * numel([shapes["prompts"]])

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5, backbone_state=None):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        self.broadcast = type(self).broadcast_shapes(config, num_clients=num_clients, shapes=shapes)
        self.latest: dict[int, np.ndarray] = {}  # each training client's last uploaded prompt
        # expert_selection=random: one shuffle of all partition ids, fixed for the run (official 296-297)
        self.order = [int(p) for p in np.random.default_rng([seed, 0x30A9]).permutation(num_clients)]
        self.unseen_latest: dict[int, np.ndarray] = {}

    def _payload(self, pid: int, own: np.ndarray | None) -> dict[str, np.ndarray]:
        k = int(self.config.num_experts)
        experts = np.zeros(self.broadcast["experts"], dtype=np.float32)
        mask = np.zeros(k, dtype=np.float32)
        if own is not None:  # a client seen before: other clients' latest prompts
            if self.config.expert_selection == "random":
                chosen = first_in_order(self.order, self.latest, pid, k)
            else:
                chosen = nearest(own, {p: v for p, v in self.latest.items() if p != pid}, k)
            for slot, other in enumerate(chosen):
                experts[slot], mask[slot] = self.latest[other], 1.0
        return {"prompts": self.global_tensors["prompts"].copy(), "experts": experts, "expert_mask": mask}

    def configure(self, server_round, partition_ids):
        return {pid: self._payload(pid, self.latest.get(pid)) for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        sent = self.global_tensors["prompts"].copy()
        metrics = super().aggregate(server_round, updates)  # P_glob: FedAvg of the uploaded prompts
        for u in updates:
            self.latest[u.partition_id] = (sent + u.deltas["prompts"]).astype(np.float32)
        return metrics

    def configure_unseen(self, server_round, partition_ids):
        return {pid: self._payload(pid, self.unseen_latest.get(pid)) for pid in partition_ids}

    def adapt_unseen(self, server_round, updates):
        """A held-out client's own prompt picks its experts next time; the trained state is untouched."""
        sent = self.global_tensors["prompts"]
        for u in updates:
            self.unseen_latest[u.partition_id] = (sent + u.deltas["prompts"]).astype(np.float32)
        return {}

    def state_dict(self):
        return {**super().state_dict(), "latest": {int(p): v.copy() for p, v in self.latest.items()}}

    def load_state_dict(self, state):
        super().load_state_dict({"global": state["global"]})
        self.latest = {int(p): np.asarray(v, dtype=np.float32).copy() for p, v in state.get("latest", {}).items()}

    # -- client side
    @classmethod
    def _init_gate(cls, ctx, state) -> dict[str, torch.Tensor]:
        from fedpers.client import seed_for

        d, g = ctx.model.embed_dim, int(ctx.cfg.strategy.gate_dim)
        out = {}
        for i, k in enumerate(GATE):
            if k in state:
                out[k] = torch.from_numpy(np.array(state[k], dtype=np.float32))
            else:
                gen = torch.Generator().manual_seed(seed_for(ctx.cfg.run.seed, ctx.partition_id, GATE_SALT, i))
                out[k] = torch.randn(d, g, generator=gen) / math.sqrt(d)
        return out

    @classmethod
    def _logits(cls, ctx, tokens, t) -> torch.Tensor:
        c = ctx.cfg.strategy
        feats = [ctx.model.features_with(tokens, t)]
        mask = t["expert_mask"]
        with torch.no_grad():  # experts are frozen
            for e in range(mask.shape[0]):
                feats.append(ctx.model.features_with(tokens, {**t, "prompts": t["experts"][e]}) if mask[e] > 0
                             else torch.zeros_like(feats[0]))
        lam, w = cls.weights(c)
        return moe_logits(feats, mask, t, lam, float(c.scaling), w)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import batch_tokens, finish, local_optimizer, start_tensors

        tensors = start_tensors(ctx, received, state)
        tensors.update(cls._init_gate(ctx, state))
        trainable = ["prompts", *[k for k in HEAD if k in ctx.shapes], *GATE]
        for k in ("experts", "expert_mask"):
            tensors[k] = torch.from_numpy(np.array(received[k], dtype=np.float32))
        if ctx.model.modality == "llm":
            return cls.client_update_llm(ctx, received, tensors, trainable)
        # Same loop, optimizer and batch order as fedpers.client.fit; only the forward pass differs.
        cc = ctx.cfg.client
        for k in trainable:
            tensors[k].requires_grad_(True)
        opt = local_optimizer([tensors[k] for k in trainable], cc)
        g, data, losses = ctx.generator(), ctx.data, []
        tokens = batch_tokens(ctx, data.x_train)
        for _ in range(cc.local_epochs):
            order = torch.randperm(data.num_train, generator=g)
            for i in range(0, data.num_train, cc.batch_size):
                idx = order[i : i + cc.batch_size]
                loss = F.cross_entropy(cls._logits(ctx, tokens(idx), tensors), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        tensors = {k: v.detach() for k, v in tensors.items()}
        return finish(ctx, cls.sends, cls.personal, received, tensors, losses,
                      eval_result=cls.evaluate_model(ctx, tensors))

    @classmethod
    @torch.no_grad()
    def evaluate_model(cls, ctx, tensors):
        if ctx.model.modality == "llm":
            return cls.evaluate_llm(ctx, tensors)
        x = ctx.model.embed(ctx.model.prepare(ctx.data.x_test))
        out = cls._logits(ctx, x, tensors)
        y = ctx.data.y_test
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


@dataclass
class PFedMoAPConvexConfig(PFedMoAPConfig):
    name: str = "pfedmoap_convex"
    lmbda: float = 0.5  # weight of the local logits; the mixture's is 1 - lmbda (lmbda = 1: the local logits alone)

    def validate(self) -> None:
        super().validate()
        require(self.lmbda <= 1, "lmbda", f"must be in [0, 1] (the mixture's weight is 1 - lmbda), got {self.lmbda}")


@register_strategy
class PFedMoAPConvex(PFedMoAP):
    """pFedMoAP with a convex combination of the final logits, ``lambda * logits_local + (1 - lambda) *
    logits_MoE``, instead of the paper's ``lambda * logits_local + logits_MoE``; everything else is
    :class:`PFedMoAP`'s. Not the paper's method (hence its own name): the paper's sum weighs the logits by
    lambda + 1 in all, which on a causal LM's next-token logits acts as a softmax temperature of
    1 / (1 + lambda) (sharper than the model's own distribution where own and mixture agree), while CLIP's
    cosine logits pass through a learned scale that absorbs it. The convex form keeps the logits' scale,
    so the two isolate what the sum itself costs."""

    name = "pfedmoap_convex"
    summary = "pFedMoAP with convex final logits, lambda * local + (1 - lambda) * MoE (a named variant; the paper sums them)"
    config_cls = PFedMoAPConvexConfig

    @classmethod
    def weights(cls, c) -> tuple[float, float]:
        return float(c.lmbda), 1.0 - float(c.lmbda)
