"""pFedLoRA-Gen: a server-side generator of client-specific LoRA factors, trained pFedPG-style.

For every LoRA-wrapped module m the server keeps a learnable bank of M basis factor pairs
(``A_bank[m]``: M x r x in, ``B_bank[m]``: M x out x r) and M keys (M x E); every client n has a learnable
descriptor ``d_n`` (E). Client n's factors for module m are an attention mixture of the bank:

    alpha_{n,m} = softmax((d_n W_Q) K_m^T / sqrt(E))          (M weights, one query per client)
    A_{n,m} = sum_j alpha_{n,m,j} A_bank[m, j],   B_{n,m} = sum_j alpha_{n,m,j} B_bank[m, j]

A and B of one module share the attention, so a client picks whole low-rank updates, not unrelated
halves. The A bases start as peft initialises A and the B bases at zero, so every client starts from
the frozen backbone. Clients train the received factors (and their personal head) and reply with
``delta = trained - received``; as in pFedPG the server treats ``-delta`` as the gradient of the
client's loss with respect to its factors and back-propagates it into every generator parameter:
``autograd.grad(factors, params, grad_outputs=-w_n delta_n)``, then an optimizer step that leaves the
descriptors (and their optimizer state) of clients that did not reply untouched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strategies._checks import require, require_choice
from strategies._generator import make_optimizer, optimizer_slots, step_rows
from strategies.base import HEAD, ClientUpdate, Strategy, StrategyConfig, numel, register_strategy, weights_of
from strategies.lora_common import lora_a, lora_b, require_lora


@dataclass
class PFedLoraGenConfig(StrategyConfig):
    name: str = "pfedlora_gen"
    server_lr: float = 1e-3  # generator learning rate
    server_optimizer: str = "adam"  # adam | sgd
    bank_size: int = 4  # M: LoRA basis pairs per module the attention mixes
    descriptor_dim: int = 32  # E: width of client descriptors, queries and keys
    descriptor_std: float = 1.0  # init std of client descriptors and keys
    weighting: str = "uniform"  # how client deltas are weighted in the generator update: uniform | num_examples

    def validate(self) -> None:
        require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
        require_choice(self.server_optimizer, "server_optimizer", ("adam", "sgd"))
        require(self.bank_size >= 1, "bank_size", f"must be >= 1, got {self.bank_size}")
        require(self.descriptor_dim >= 1, "descriptor_dim", f"must be >= 1, got {self.descriptor_dim}")
        require(self.descriptor_std > 0, "descriptor_std", f"must be > 0, got {self.descriptor_std}")
        require_choice(self.weighting, "weighting", ("uniform", "num_examples"))


class LoraGenerator(nn.Module):
    def __init__(self, num_clients: int, shapes: dict[str, tuple[int, ...]], bank_size: int, dim: int,
                 std: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a_names, self.b_names = list(lora_a(shapes)), list(lora_b(shapes))
        self.dim = dim
        self.descriptors = nn.Parameter(torch.randn(num_clients, dim, generator=g) * std)
        self.w_q = nn.Linear(dim, dim, bias=False)
        nn.init.orthogonal_(self.w_q.weight, generator=g)
        n_mod = len(self.a_names)
        self.keys = nn.Parameter(torch.randn(n_mod, bank_size, dim, generator=g) * std)
        banks_a, banks_b = [], []
        for a, b in zip(self.a_names, self.b_names):
            r, fan_in = shapes[a]
            bound = 1.0 / math.sqrt(fan_in)  # peft's A init, one draw per basis
            banks_a.append(nn.Parameter((torch.rand(bank_size, r, fan_in, generator=g) * 2 - 1) * bound))
            banks_b.append(nn.Parameter(torch.zeros(bank_size, *shapes[b])))
        self.bank_a = nn.ParameterList(banks_a)
        self.bank_b = nn.ParameterList(banks_b)

    def attention(self, client_idx: torch.Tensor) -> torch.Tensor:
        """(C,) client indices -> (C, modules, M) mixture weights."""
        q = self.w_q(self.descriptors[client_idx])
        return torch.softmax(torch.einsum("ce,mje->cmj", q, self.keys) / math.sqrt(self.dim), dim=-1)

    def forward(self, client_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """(C,) client indices -> {tensor name: (C, *shape)} LoRA factors."""
        attn = self.attention(client_idx)
        out = {}
        for m, (a, b) in enumerate(zip(self.a_names, self.b_names)):
            out[a] = torch.einsum("cj,jrk->crk", attn[:, m], self.bank_a[m])
            out[b] = torch.einsum("cj,jor->cor", attn[:, m], self.bank_b[m])
        return out


@register_strategy
class PFedLoraGen(Strategy):
    name = "pfedlora_gen"
    summary = "server-side attention generator of client-specific LoRA factors, chain-rule update (pFedPG for LoRA)"
    config_cls = PFedLoraGenConfig
    modalities = ("text", "llm")
    adapters = ("lora",)

    @classmethod
    def tensor_roles(cls, shapes):
        return lora_a(shapes) + lora_b(shapes), HEAD

    @classmethod
    def generator_shapes(cls, config, *, num_clients, shapes):
        """Every generator parameter by name, as ``generator.named_parameters()`` will have it."""
        m, e = config.bank_size, config.descriptor_dim
        a_names, b_names = lora_a(shapes), lora_b(shapes)
        out = {"descriptors": (num_clients, e), "w_q.weight": (e, e), "keys": (len(a_names), m, e)}
        out.update({f"bank_a.{i}": (m, *shapes[a]) for i, a in enumerate(a_names)})
        out.update({f"bank_b.{i}": (m, *shapes[b]) for i, b in enumerate(b_names)})
        return out

    @classmethod
    def server_state_numel(cls, config, *, num_clients, shapes):
        """The generator's parameters and its optimizer's per-parameter state (no momentum here)."""
        params = numel(cls.generator_shapes(config, num_clients=num_clients, shapes=shapes).values())
        return params * (1 + optimizer_slots(config.server_optimizer))

    def __init__(self, config, *, num_clients, shapes, seed, init_std=0.5):
        super().__init__(config, num_clients=num_clients, shapes=shapes, seed=seed, init_std=init_std)
        require_lora(shapes, self.name)
        self.generator = LoraGenerator(num_clients, shapes, config.bank_size, config.descriptor_dim,
                                       config.descriptor_std, seed)
        self.optimizer = make_optimizer(list(self.generator.parameters()), config.server_optimizer, config.server_lr)

    def generate(self, partition_ids: list[int]) -> dict[str, torch.Tensor]:
        return self.generator(torch.as_tensor(partition_ids, dtype=torch.long))

    def configure(self, server_round, partition_ids):
        with torch.no_grad():
            gen = {k: v.numpy().astype(np.float32) for k, v in self.generate(partition_ids).items()}
        return {pid: {k: gen[k][i].copy() for k in self.sends} for i, pid in enumerate(partition_ids)}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        pids = [u.partition_id for u in updates]
        w = weights_of(updates, self.config.weighting)
        names = list(self.sends)
        # Pseudo-gradient of the weighted client losses w.r.t. each client's factors: -w_n * delta_n.
        grad_out = [torch.stack([-float(wi) * torch.from_numpy(np.asarray(u.deltas[k], dtype=np.float32))
                                 for wi, u in zip(w, updates)]) for k in names]
        gen = self.generate(pids)
        params = list(self.generator.parameters())
        grads = torch.autograd.grad([gen[k] for k in names], params, grad_outputs=grad_out)
        self.optimizer.zero_grad(set_to_none=True)
        for p, gp in zip(params, grads):
            p.grad = gp
        # absent clients' descriptors and their optimizer-state rows stay as they are
        step_rows(self.optimizer, self.generator.descriptors, pids)
        return {"pseudo_grad_norm": float(torch.sqrt(sum((g ** 2).sum() for g in grad_out)))}

    def state_dict(self):
        # Deep copies, as in pfedpg: optimizer.load_state_dict may keep tensors by reference.
        return copy.deepcopy({"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state_dict(self, state):
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
