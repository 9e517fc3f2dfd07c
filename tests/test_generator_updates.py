"""Generator strategies (pfedpg, pfedhn, pfedlora_gen) under partial participation and pFedHN's per-reply
optimizer, plus a learning test where each client wants its own prompts: a generator that personalizes
must reach every client's target, which one shared prompt (or a sign-flipped update) cannot."""

import numpy as np
import pytest
import torch

from strategies import ClientUpdate, create_strategy, get_config_cls

K, D, N = 3, 8, 4


def lora_shapes():
    return {"m1.lora_A.weight": (2, 6), "m1.lora_B.weight": (5, 2), "head.weight": (2, 5), "head.bias": (2,)}


def make(name, **cfg):
    shapes = lora_shapes() if name == "pfedlora_gen" else {"prompts": (K, D)}
    return create_strategy(get_config_cls(name)(**cfg), num_clients=N, shapes=shapes, seed=0)


def reply(s, pid, rng, scale=1.0):
    sent = s.configure(0, [pid])[pid]
    return ClientUpdate(pid, {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sent.items()},
                        10, {})


def opt_rows(s, row: int) -> dict:
    st = s.optimizer.state.get(s.generator.descriptors, {})
    return {k: v[row].clone() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}


@pytest.mark.parametrize("name, opt", [
    ("pfedpg", {"server_optimizer": "adam", "server_lr": 1e-2}),
    ("pfedhn", {"server_optimizer": "adam", "server_lr": 1e-2}),
    ("pfedhn", {"server_optimizer": "sgd", "server_lr": 1e-2, "server_momentum": 0.9, "server_weight_decay": 1e-3,
                "server_steps": "per_reply"}),
    ("pfedlora_gen", {"server_optimizer": "adam", "server_lr": 1e-2}),
])
def test_clients_that_do_not_reply_keep_their_descriptor_and_its_optimizer_state(name, opt):
    s = make(name, **opt)
    rng = np.random.default_rng(0)
    s.aggregate(1, [reply(s, 0, rng), reply(s, 1, rng)])  # client 0 takes part once, building momentum
    d0, state0 = s.generator.descriptors[0].detach().clone(), opt_rows(s, 0)
    assert state0 and any(float(v.abs().max()) > 0 for v in state0.values())  # there is momentum to leak
    others = {k: v.detach().clone() for k, v in s.generator.named_parameters() if k != "descriptors"}
    d1 = s.generator.descriptors[1].detach().clone()
    for r in range(2, 6):  # then only clients 1 and 2 reply
        s.aggregate(r, [reply(s, 1, rng), reply(s, 2, rng)])
    torch.testing.assert_close(s.generator.descriptors[0].detach(), d0, rtol=0, atol=0)
    for k, v in opt_rows(s, 0).items():
        torch.testing.assert_close(v, state0[k], rtol=0, atol=0)
    # not vacuous: the shared parameters and the replying clients' descriptors did move
    assert any(not torch.equal(v, others[k]) for k, v in s.generator.named_parameters() if k != "descriptors")
    assert not torch.equal(s.generator.descriptors[1].detach(), d1)


def test_pfedhn_per_reply_is_one_sgd_momentum_step_per_client_in_order():
    """Reference: the same hypernetwork, stepped by hand for client 1 then client 3 (each gradient taken
    after the previous step), SGD with momentum 0.9 and weight decay; rows of absent clients frozen."""
    lr, mom, wd = 0.05, 0.9, 1e-3
    cfg = {"server_optimizer": "sgd", "server_lr": lr, "server_momentum": mom, "server_weight_decay": wd,
           "server_steps": "per_reply", "embed_dim": 3, "hidden_dim": 5, "n_hidden": 1}
    s = make("pfedhn", **cfg)
    ref = make("pfedhn", **cfg)
    params = dict(ref.generator.named_parameters())
    bufs = {k: torch.zeros_like(p) for k, p in params.items()}
    rng = np.random.default_rng(4)
    for r in (1, 2):
        deltas = {i: rng.standard_normal((K, D)).astype(np.float32) for i in (1, 3)}
        s.aggregate(r, [ClientUpdate(i, {"prompts": deltas[i]}, 7 * i, {}) for i in (1, 3)])
        for i in (1, 3):  # by hand: g = J^T (-delta) + wd * p; buf = mom * buf + g; p -= lr * buf
            out = ref.generator(torch.tensor([i]))[0]
            grads = torch.autograd.grad(out, list(params.values()), grad_outputs=-torch.from_numpy(deltas[i]))
            with torch.no_grad():
                for (k, p), g in zip(params.items(), grads):
                    g = g + wd * p
                    new_buf = mom * bufs[k] + g
                    step = p - lr * new_buf
                    if k == "descriptors":  # only row i moves, and only row i's momentum
                        step, buf_rows = p.clone(), bufs[k].clone()
                        step[i], buf_rows[i] = (p - lr * new_buf)[i], new_buf[i]
                        new_buf = buf_rows
                    bufs[k] = new_buf
                    p.copy_(step)
    for k, v in s.generator.state_dict().items():
        torch.testing.assert_close(v, ref.generator.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["pfedpg", "pfedhn"])
def test_generator_personalizes_to_each_clients_own_target(name):
    """Each client's training pulls its prompts toward its own target. A working chain-rule update must
    bring every client close to its own target, far closer than the best single prompt for all (the mean
    target); the same loop with the delta's sign flipped must not."""
    # targets the architecture can reach: what another generator of the same kind (seed 7) emits
    other = create_strategy(get_config_cls(name)(), num_clients=N, shapes={"prompts": (K, D)}, seed=7)
    sent = other.configure(0, list(range(N)))
    targets = np.stack([sent[i]["prompts"] for i in range(N)])
    shared_best = float(np.mean([np.linalg.norm(t - targets.mean(0)) for t in targets]))

    def train(sign):
        s = make(name, server_optimizer="adam", server_lr=2e-2)
        for r in range(1, 301):
            sent = s.configure(r, list(range(N)))
            s.aggregate(r, [ClientUpdate(i, {"prompts": sign * 0.5 * (targets[i] - sent[i]["prompts"])}, 10, {})
                            for i in range(N)])
        sent = s.configure(0, list(range(N)))
        return max(float(np.linalg.norm(sent[i]["prompts"] - targets[i])) for i in range(N))

    good, flipped = train(1.0), train(-1.0)
    assert good < 0.25 * shared_best, (good, shared_best)
    assert flipped > shared_best, (flipped, shared_best)
