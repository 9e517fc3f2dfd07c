"""APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", 2020): each client keeps a
personal model v and a mixing weight alpha, and is evaluated with the mixture
``v_bar = alpha * v + (1 - alpha) * w`` of its personal and the global model w (prompts and head mixed
tensor by tensor); w is averaged by FedAvg.

``apfl`` follows Algorithm 1: on every local mini-batch xi, from the same point (t-1),

    w <- w - eta * grad f(w; xi)                                   (line 6)
    v <- v - eta * grad_v f(v_bar; xi) = v - eta * alpha * grad f(v_bar; xi)   (line 7)
    alpha <- alpha - eta_alpha * <v - w, grad f(v_bar; xi)>        (eq. 10: d f(v_bar) / d alpha)

with alpha kept in [0, 1] (projected, as the authors' code clips it; their extra 0.02 * alpha penalty is
not part of the paper's update and is left out). Each client's alpha lives with the client
(``personal.alpha``) and is reported per round as the ``alpha`` metric. Budget: each mini-batch makes one
w step and one v step, so a round runs half the local budget's mini-batches (``client.local_epochs``
passes, counted in optimizer steps).

Server: w is averaged over the round's clients U_t with equal weights, ``w = 1/|U_t| sum_{j in U_t} w_j``,
as the authors' code (MLOPTPSU/FedTorch) does: ``rank_weight = 1.0 / num_online_clients``
(``fedtorch/comms/algorithms/federated/fedavg.py`` 24; ``federated/centered/fedavg.py`` 17, used by
``comms/trainings/federated/centered/apfl.py`` 141). ``weighting`` defaults to that ``uniform``;
``num_examples`` weights by training-set size (FedAvg's choice).

``apfl_fixed`` is the earlier simplification, kept as a separately named variant: alpha is fixed, w is
trained first (half the budget), then v through the mixture with w fixed (the other half)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from strategies._avg import PERSONAL, Averaging, AveragingConfig, as_torch
from strategies._checks import require
from strategies.base import HEAD, register_strategy

SHARED = ("prompts", *HEAD)
ALPHA = PERSONAL + "alpha"


def mix(v: dict[str, torch.Tensor], w: dict[str, torch.Tensor], alpha) -> dict[str, torch.Tensor]:
    return {k: alpha * v[k] + (1 - alpha) * w[k] for k in w}


def apfl_step(w: dict[str, torch.Tensor], v: dict[str, torch.Tensor], alpha: float,
              loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
              opt_w: torch.optim.Optimizer, opt_v: torch.optim.Optimizer, alpha_lr: float) -> tuple[float, float]:
    """One step of Algorithm 1 on one mini-batch (``loss_of``): every gradient is taken at the current
    (w, v, alpha) before any of them moves. Updates w and v in place; returns (mixed loss, new alpha)."""
    loss_w = loss_of(w)
    gw = torch.autograd.grad(loss_w, list(w.values()))
    a = torch.tensor(float(alpha), requires_grad=True)
    loss_v = loss_of(mix(v, {k: t.detach() for k, t in w.items()}, a))
    gv = torch.autograd.grad(loss_v, [*v.values(), a])
    opt_w.zero_grad(set_to_none=True)
    opt_v.zero_grad(set_to_none=True)
    for t, g in zip(w.values(), gw):
        t.grad = g
    for t, g in zip(v.values(), gv[:-1]):
        t.grad = g
    opt_w.step()
    opt_v.step()
    new_alpha = float(np.clip(float(alpha) - alpha_lr * float(gv[-1]), 0.0, 1.0))
    return float(loss_v.detach()), new_alpha


def _optimizer(ctx, tensors):
    from fedpers.client import local_optimizer

    return local_optimizer(list(tensors), ctx.cfg.client)


def _personal_start(ctx, state):
    from fedpers.client import initial_tensor

    # v starts where a ``local`` client would start.
    return {k: (as_torch(state, [PERSONAL + k])[PERSONAL + k] if PERSONAL + k in state else initial_tensor(ctx, k))
            for k in SHARED}


@dataclass
class APFLConfig(AveragingConfig):
    name: str = "apfl"
    weighting: str = "uniform"  # average of w over the round's clients: uniform (1/|U|, the authors' FedTorch code) | num_examples
    alpha: float = 0.5  # initial mixing weight of the personal model in alpha*v + (1-alpha)*w, in [0, 1]; adapted per client
    alpha_lr: float | None = None  # step size of the alpha update (eq. 10); None: client.lr, the paper's single eta for w, v and alpha

    def validate(self) -> None:
        super().validate()
        require(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.alpha_lr is None or self.alpha_lr >= 0, "alpha_lr", f"must be >= 0, got {self.alpha_lr}")


@register_strategy
class APFL(Averaging):
    name = "apfl"
    summary = "FedAvg global model mixed with a personal model, adaptive alpha, interleaved updates (APFL, Alg. 1)"
    config_cls = APFLConfig
    sends = SHARED
    personal = (*(PERSONAL + k for k in SHARED), ALPHA)

    @classmethod
    def client_update(cls, ctx, received, state):
        import torch.nn.functional as F

        from fedpers.client import batch_indices, batch_tokens, finish, local_budget, start_tensors, token_logits

        c = ctx.cfg.strategy
        alpha_lr = ctx.cfg.client.lr if c.alpha_lr is None else float(c.alpha_lr)
        alpha = float(state[ALPHA][0]) if ALPHA in state else float(c.alpha)
        w = {k: t.requires_grad_(True) for k, t in start_tensors(ctx, received, {}).items() if k in SHARED}
        v = {k: t.requires_grad_(True) for k, t in _personal_start(ctx, state).items()}
        opt_w, opt_v = _optimizer(ctx, w.values()), _optimizer(ctx, v.values())
        tokens, y = batch_tokens(ctx, ctx.data.x_train), ctx.data.y_train
        losses = []
        batches = max(1, local_budget(ctx) // 2)  # one w step + one v step per mini-batch
        for idx in batch_indices(ctx, batches):
            x = tokens(idx)
            def loss_of(t, x=x, idx=idx):
                return F.cross_entropy(token_logits(ctx, x, t), y[idx])

            loss, alpha = apfl_step(w, v, alpha, loss_of, opt_w, opt_v, alpha_lr)
            losses.append(loss)
        w = {k: t.detach() for k, t in w.items()}
        v = {k: t.detach() for k, t in v.items()}
        reply, _ = finish(ctx, cls.sends, (), received, w, losses, eval_tensors=mix(v, w, alpha),
                          local_steps=2 * len(losses), extra_metrics={"alpha": alpha})
        new_state = {PERSONAL + k: v[k].numpy().astype(np.float32).copy() for k in SHARED}
        new_state[ALPHA] = np.array([alpha], dtype=np.float32)
        return reply, new_state


@dataclass
class APFLFixedConfig(AveragingConfig):
    name: str = "apfl_fixed"
    weighting: str = "uniform"  # as apfl: uniform (1/|U|) | num_examples
    alpha: float = 0.5  # fixed weight of the personal model in the evaluated mixture alpha*v + (1-alpha)*w, in [0, 1]

    def validate(self) -> None:
        super().validate()
        require(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")


@register_strategy
class APFLFixed(Averaging):
    name = "apfl_fixed"
    summary = "APFL simplified: fixed alpha, w trained then v through the mixture (not the paper's Alg. 1)"
    config_cls = APFLFixedConfig
    sends = SHARED
    personal = tuple(PERSONAL + k for k in SHARED)

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, split_budget, start_tensors

        alpha = float(ctx.cfg.strategy.alpha)
        w_steps, v_steps = split_budget(ctx, 0.5)
        w = start_tensors(ctx, received, {})
        w_losses = fit(ctx, w, list(SHARED), None, steps=w_steps)
        both = dict(w)
        both.update({PERSONAL + k: t for k, t in _personal_start(ctx, state).items()})

        def mixed(t):
            return mix({k: t[PERSONAL + k] for k in SHARED}, {k: t[k] for k in SHARED}, alpha)

        losses = fit(ctx, both, [PERSONAL + k for k in SHARED], None, view=mixed, steps=v_steps)
        reply, _ = finish(ctx, cls.sends, (), received, w, losses, eval_tensors=mixed(both),
                          local_steps=len(w_losses) + len(losses))
        return reply, {PERSONAL + k: both[PERSONAL + k].numpy().astype(np.float32).copy() for k in SHARED}
