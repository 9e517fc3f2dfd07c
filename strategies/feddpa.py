"""FedDPA-T (Yang et al., NeurIPS 2024, "Dual-Personalizing Adapter for Federated Foundation Models",
Sec. 4: dual adapters, alternating training, instance-wise dynamic weighting).

Each client holds two LoRA adapters on the frozen model: a *global* one (``<module>.lora_{A,B}``), sent,
trained and averaged by FedAvg every round, and a *local* one (``local.<module>.lora_{A,B}``) that never
leaves the client. The model runs with both, mixed:

    h = W0 x + s [ (1 - a) B_g A_g + a B_l A_l ] x                         (s = lora_alpha / r)

- training (FedDPA-T: both adapters learn every round, alternately): first the global adapter with the
  local one frozen, then the local adapter with the (updated) global one frozen, both with the fixed
  training weight ``a = strategy.train_weight`` (the official code mixes 0.5 / 0.5); the personal head
  trains in both phases. The two phases split the one local budget every strategy gets
  (``client.local_epochs`` passes, counted in optimizer steps): ``strategy.global_fraction`` of the
  steps on the global adapter, the rest on the local one;
- test time, per instance x (instance-wise dynamic weighting):

      a(x) = max_weight * (1/M) sum_{i=1..M} cos(e(x), e(s_i))

  with e(.) the model's pooled features under the local adapter alone and s_1..s_M ``instance_num``
  of the client's own training instances (the official code: M = 5, max weight 0.5). Each test instance
  gets its own forward pass with its own a(x).

Frozen-backbone form: the frozen adapter of a phase enters as a fold (``strategies.lora_fold``), the
trainable one as the model's LoRA with B scaled by its weight; both are exact. Simplified (named here,
not hidden): the M reference instances are one seeded draw per round (the official code draws them
afresh for every test instance), and their features travel with the personal model (``feddpa.ref``)
so a cross-evaluation scores another client's data against the model owner's references.
FedDPA-F (global training first, local fine-tuning after it) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from strategies._checks import require
from strategies.base import HEAD, register_strategy
from strategies.lora_baselines import _LoraAvg
from strategies.lora_common import LoraAvgConfig
from strategies.lora_fold import a_of, b_of, factor_names, fold_of, lora_scaling, modules

LOCAL = "local."  # prefix of the local adapter's tensors (personal)
REF = "feddpa.ref"  # features of the reference instances, part of the evaluated model
LOCAL_SALT = 0xD9A


@dataclass
class FedDPAConfig(LoraAvgConfig):
    name: str = "feddpa"
    train_weight: float = 0.5  # a while training: weight of the local adapter (1 - a: the global one), in [0, 1]
    max_weight: float = 0.5  # test-time a(x) = max_weight * mean cosine similarity to the reference instances, in [0, 1]
    instance_num: int = 5  # M: own training instances whose features a test instance is compared with
    global_fraction: float = 0.5  # share of the local budget (optimizer steps) spent on the global adapter; the rest trains the local one

    def validate(self) -> None:
        super().validate()
        require(0 <= self.train_weight <= 1, "train_weight", f"must be in [0, 1], got {self.train_weight}")
        require(0 <= self.max_weight <= 1, "max_weight", f"must be in [0, 1], got {self.max_weight}")
        require(self.instance_num >= 1, "instance_num", f"must be >= 1, got {self.instance_num}")
        require(0 < self.global_fraction < 1, "global_fraction", f"must be in (0, 1), got {self.global_fraction}")


def instance_weight(emb: torch.Tensor, ref: torch.Tensor, max_weight: float) -> torch.Tensor:
    """a(x) for each row of ``emb`` (N, D) against the references ``ref`` (M, D): max_weight * mean cos."""
    return max_weight * F.cosine_similarity(emb.unsqueeze(1), ref.unsqueeze(0), dim=-1).mean(1)


def mixed(shapes, tensors: dict[str, torch.Tensor], a, s: float, train_local: bool) -> dict[str, torch.Tensor]:
    """The model's tensors for h = W0 + s[(1 - a) B_g A_g + a B_l A_l]: the trainable adapter as the
    LoRA (B times its weight), the frozen one folded into W0 (no gradient)."""
    out = {k: tensors[k] for k in HEAD}
    for m in modules(shapes):
        tr, fr = (LOCAL, "") if train_local else ("", LOCAL)
        w_tr, w_fr = (a, 1 - a) if train_local else (1 - a, a)
        out[a_of(m)] = tensors[tr + a_of(m)]
        out[b_of(m)] = w_tr * tensors[tr + b_of(m)]
        out[fold_of(m)] = (w_fr * s) * (tensors[fr + b_of(m)] @ tensors[fr + a_of(m)]).detach()
    return out


def local_only(shapes, tensors):
    return {**{k: tensors[LOCAL + k] for k in factor_names(shapes)}, **{k: tensors[k] for k in HEAD}}


@register_strategy
class FedDPA(_LoraAvg):
    name = "feddpa"
    summary = "global LoRA averaged + local LoRA kept, mixed per test instance by feature similarity (FedDPA-T)"
    config_cls = FedDPAConfig

    @classmethod
    def tensor_roles(cls, shapes):
        return factor_names(shapes), tuple(LOCAL + k for k in factor_names(shapes)) + HEAD

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, fit, seed_for, split_budget, start_tensors
        from fedpers.models.text import init_lora_tensor

        c, shapes = ctx.cfg.strategy, ctx.shapes
        s = lora_scaling(ctx.cfg)
        tensors = start_tensors(ctx, received, state)
        for i, k in enumerate(factor_names(shapes)):
            if LOCAL + k in state:
                tensors[LOCAL + k] = torch.from_numpy(np.array(state[LOCAL + k], dtype=np.float32))
            else:  # peft's init (B = 0), seeded per client: the local adapter starts switched off
                g = torch.Generator().manual_seed(seed_for(ctx.cfg.run.seed, ctx.partition_id, LOCAL_SALT, i))
                tensors[LOCAL + k] = init_lora_tensor(k, shapes[k], g)
        a = float(c.train_weight)
        global_steps, local_steps = split_budget(ctx, c.global_fraction)
        losses = fit(ctx, tensors, list(factor_names(shapes)) + list(HEAD), None, steps=global_steps, salt=1,
                     view=lambda t: mixed(shapes, t, a, s, train_local=False))
        losses += fit(ctx, tensors, [LOCAL + k for k in factor_names(shapes)] + list(HEAD), None, steps=local_steps,
                      salt=2, view=lambda t: mixed(shapes, t, a, s, train_local=True))
        model = {**tensors, REF: cls.references(ctx, tensors)}
        sends, personal = cls.tensor_roles(shapes)
        return finish(ctx, sends, personal, received, tensors, losses, eval_tensors=model,
                      eval_result=cls.evaluate_model(ctx, model))

    @classmethod
    @torch.no_grad()
    def references(cls, ctx, tensors) -> torch.Tensor:
        """Features (local adapter alone) of ``instance_num`` seeded draws from the client's training split."""
        n = ctx.data.num_train
        m = min(int(ctx.cfg.strategy.instance_num), n)
        idx = torch.randperm(n, generator=ctx.generator(3))[:m]
        x = ctx.model.prepare(ctx.data.x_train)[idx]
        return ctx.model.features_with(ctx.model.embed(x), local_only(ctx.shapes, tensors))

    @classmethod
    @torch.no_grad()
    def evaluate_model(cls, ctx, tensors):
        c = ctx.cfg.strategy
        s = lora_scaling(ctx.cfg)
        x = ctx.model.embed(ctx.model.prepare(ctx.data.x_test))
        emb = ctx.model.features_with(x, local_only(ctx.shapes, tensors))
        alpha = instance_weight(emb, tensors[REF], float(c.max_weight))
        out = []
        for i in range(x.shape[0]):  # one model per instance: its own a(x)
            t = mixed(ctx.shapes, tensors, float(alpha[i]), s, train_local=True)
            feats = ctx.model.features_with(x[i : i + 1], t)
            out.append(F.linear(feats, t["head.weight"], t["head.bias"]))
        logits = torch.cat(out)
        y = ctx.data.y_test
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
