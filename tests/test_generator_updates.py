"""Generator strategies (pfedpg, pfedhn, pfedlora_gen) under partial participation and pFedHN's per-reply
optimizer, plus a learning test where each client wants its own prompts: a generator that personalizes
must reach every client's target, which one shared prompt (or a sign-flipped update) cannot."""

import copy

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
    """Reference: the same hypernetwork, stepped by hand for client 1 then client 3, SGD with momentum 0.9
    and weight decay; both clients' gradients taken at the round's (sending) generator, as pFedHN's code
    takes each client's gradient at the hypernetwork that generated its weights (trainer.py 126, 172-174);
    rows of absent clients frozen."""
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
        sender = copy.deepcopy(ref.generator)  # the generator that produced this round's prompts
        round_grads = {i: torch.autograd.grad(sender(torch.tensor([i]))[0], list(sender.parameters()),
                                              grad_outputs=-torch.from_numpy(deltas[i])) for i in (1, 3)}
        for i in (1, 3):  # by hand: g = J^T (-delta) + wd * p; buf = mom * buf + g; p -= lr * buf
            with torch.no_grad():
                for (k, p), g in zip(params.items(), round_grads[i]):
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


def record_steps(monkeypatch):
    """Wrap the generator's optimizer step: record every parameter's gradient as the step sees it."""
    import strategies._generator as gen

    seen = []
    real = gen.step_rows

    def spy(optimizer, descriptors, rows):
        seen.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        real(optimizer, descriptors, rows)

    monkeypatch.setattr(gen, "step_rows", spy)
    return seen


def test_pfedhn_per_reply_takes_every_gradient_at_the_generator_that_sent_the_prompts(monkeypatch):
    """Two replies in one round: the second step's gradient is J^T(-delta) at the round-start generator
    (the one that generated that client's prompts), not at the generator the first step already moved."""
    cfg = {"server_optimizer": "sgd", "server_lr": 0.5, "server_steps": "per_reply",
           "embed_dim": 3, "hidden_dim": 5, "n_hidden": 1}
    s = make("pfedhn", **cfg)
    start = copy.deepcopy(s.generator)
    rng = np.random.default_rng(1)
    deltas = {i: rng.standard_normal((K, D)).astype(np.float32) for i in (0, 2)}
    seen = record_steps(monkeypatch)
    s.aggregate(1, [ClientUpdate(i, {"prompts": deltas[i]}, 10, {}) for i in (0, 2)])
    assert len(seen) == 2  # one step per reply

    def grads_at(gen, i):
        return torch.autograd.grad(gen(torch.tensor([i]))[0], list(gen.parameters()),
                                   grad_outputs=-torch.from_numpy(deltas[i]))

    for got, want in zip(seen, (grads_at(start, 0), grads_at(start, 2))):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # not vacuous: at the generator after client 0's step, client 2's gradient is a different one
    moved, first = copy.deepcopy(start), grads_at(start, 0)
    with torch.no_grad():
        for p, g in zip(moved.parameters(), first):
            p -= 0.5 * g
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(grads_at(moved, 2), seen[1]))


@pytest.mark.parametrize("steps", ["per_reply", "per_round"])
def test_generator_gradient_is_clipped_to_server_grad_clip(steps):
    """pFedHN's code clips the hypernetwork's gradient to norm 50 before each step (trainer.py 180).
    Plain SGD, lr 1: a step moves the parameters by exactly the clipped gradient, so the total norm of the
    move is min(||g||, clip) and its direction is g's."""
    cfg = {"server_optimizer": "sgd", "server_lr": 1.0, "server_steps": steps,
           "embed_dim": 3, "hidden_dim": 5, "n_hidden": 1}
    delta = np.random.default_rng(2).standard_normal((K, D)).astype(np.float32)
    probe = make("pfedhn", **cfg)
    g = torch.autograd.grad(probe.generator(torch.tensor([1]))[0], list(probe.generator.parameters()),
                            grad_outputs=-torch.from_numpy(delta))
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in g)))
    for clip, expect in ((norm / 4, norm / 4), (4 * norm, norm)):  # clipped; below the bound: untouched
        s = make("pfedhn", server_grad_clip=clip, **cfg)
        before = [p.detach().clone() for p in s.generator.parameters()]
        s.aggregate(1, [ClientUpdate(1, {"prompts": delta}, 10, {})])
        move = [b - p.detach() for b, p in zip(before, s.generator.parameters())]
        moved = float(torch.sqrt(sum((m.double() ** 2).sum() for m in move)))
        assert moved == pytest.approx(expect, rel=1e-4)
        for m, gi in zip(move, g):
            torch.testing.assert_close(m, gi * (expect / norm), rtol=1e-4, atol=1e-6)


def test_pfedhn_paper_config_clips_at_50():
    from pathlib import Path

    from fedpers.experiment import load_config

    paper = load_config(Path(__file__).resolve().parents[1] / "experiments/configs/pfedhn_paper.yaml", []).strategy
    assert paper.server_steps == "per_reply" and paper.server_grad_clip == 50
    assert get_config_cls("pfedhn")().server_grad_clip == 0  # the Adam default: no clipping


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
