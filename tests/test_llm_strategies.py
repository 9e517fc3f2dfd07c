"""FedDPA and pFedMoAP on the llm modality (a tiny random Llama, chitchat speakers; tests/llm_helpers.py).

FedDPA: a global LoRA averaged, a local one kept, and each test reply scored under its own mixture
W0 + s[a(x) B_g A_g + (1 - a(x)) B_l A_l], a(x) from the last context token's hidden state under the
local adapter alone (the official GlobalModel_generated.py 312-346). pFedMoAP: soft-prompt experts
mixed per reply by the client's gate, whose query is the frozen model's last context state."""

import math

import numpy as np
import pytest
import torch

from fedpers.experiment import load_config
from fedpers.rounds.server import build_strategy, run_server
from strategies import get_strategy_class
from strategies.feddpa import LOCAL, REF, FedDPA
from strategies.lora_fold import a_of, b_of, factor_names, fold_of, lora_scaling, modules
from tests.llm_helpers import llm_tiny_overrides
from tests.test_feddpa import Spy

EXAMPLES = [  # two replies with different contexts (words of the tiny tokenizer's vocabulary)
    {"context": [{"role": "user", "content": "what is the capital of france"}], "target": "paris ."},
    {"context": [{"role": "user", "content": "do you like pizza or pasta with cheese"}], "target": "i like pizza"},
]


def _ctx(tmp_path, strategy, adapter, **extra):
    import dataclasses
    from types import SimpleNamespace

    from fedpers.client import make_context

    cfg = load_config(None, llm_tiny_overrides(tmp_path, adapter, **{"strategy.name": strategy, **extra}))
    ctx = make_context(cfg, 0, 2)
    return dataclasses.replace(ctx, data=SimpleNamespace(x_test=EXAMPLES, y_test=torch.zeros(2), num_train=0))


# --- FedDPA -------------------------------------------------------------------------------------------


def test_feddpa_runs_on_llm_and_keeps_the_local_adapter_home(tmp_path):
    """Two rounds (the second has the local phase): finite perplexity for every speaker, only the global
    adapter travels, and every speaker's local adapter has learned (B moved off its zero start)."""
    cfg = load_config(
        None,
        llm_tiny_overrides(
            tmp_path, "lora", **{"strategy.name": "feddpa", "run.rounds": 2, "model.llm.generations": 0}
        ),
    )
    t = Spy(cfg)
    summary = run_server(cfg, t, build_strategy(cfg))
    losses = summary["final"]["per_client_loss"]
    assert len(losses) == cfg.run.num_clients and all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(summary["final"]["perplexity_mean"])
    assert not any(k.startswith(LOCAL) for msgs in t.sent for a in msgs.values() for k in a)
    assert not any(k.startswith("delta/" + LOCAL) for rs in t.received for r in rs.values() for k in r.arrays)
    states = [t.states[p] for p in sorted(t.states)]
    b = next(k for k in states[0] if k.startswith(LOCAL) and k.endswith("lora_B.weight"))
    assert all(np.abs(s[b]).max() > 0 for s in states)


def _hand_mixture(shapes, tensors, w_global, w_local, s):
    """W0 + s[w_global B_g A_g + w_local B_l A_l] as one dense fold per module (LoRA B = 0), written
    independently of strategies.feddpa.mixed."""
    out = {}
    for m in modules(shapes):
        out[a_of(m)] = tensors[a_of(m)]
        out[b_of(m)] = torch.zeros_like(tensors[b_of(m)])
        out[fold_of(m)] = s * (
            w_global * tensors[b_of(m)] @ tensors[a_of(m)]
            + w_local * tensors[LOCAL + b_of(m)] @ tensors[LOCAL + a_of(m)]
        )
    return out


def test_feddpa_llm_scores_each_reply_with_a_of_x_on_the_global_adapter(tmp_path):
    """evaluate_model on llm scores reply x under W0 + s[a(x) B_g A_g + (1 - a(x)) B_l A_l], a(x) = max_weight
    x mean cosine of the final hidden state at x's last context token (the context run alone, here through
    a prompt-only forward) under the local adapter alone, to the references'. One reference is the first
    reply's own context, so a = 1 there and less on the other; a constant a, or a(x) on the local adapter,
    gives another loss, so the test fails on either mistake."""
    ctx = _ctx(tmp_path, "feddpa", "lora", **{"strategy.max_weight": 1.0})
    model, shapes, s = ctx.model, ctx.shapes, lora_scaling(ctx.cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k, shape in shapes.items():
        tensors[k] = torch.randn(*shape, generator=g)
        tensors[LOCAL + k] = torch.randn(*shape, generator=g)
    local_alone = {k: tensors[LOCAL + k] for k in factor_names(shapes)}
    with torch.no_grad():  # the contexts alone, each in its own forward pass: its last position
        emb = torch.cat(
            [
                model.hidden(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), local_alone)[:, -1]
                for ids in (model.chat.prompt_ids(ex["context"]) for ex in EXAMPLES)
            ]
        )
    tensors[REF] = emb[:1].clone()
    a = torch.nn.functional.cosine_similarity(emb, tensors[REF], dim=-1).tolist()
    assert a[0] == pytest.approx(1.0, abs=1e-5) and a[0] - a[1] > 0.05, a

    def loss_of(weights):  # token-weighted NLL, reply i under weights[i] = (w_global, w_local)
        batch = model.prepare(EXAMPLES)
        stats = [
            model.token_stats(batch.select([i]), _hand_mixture(shapes, tensors, *w, s)) for i, w in enumerate(weights)
        ]
        return sum(x[0] for x in stats) / sum(x[1] for x in stats), sum(x[2] for x in stats) / sum(x[1] for x in stats)

    expected = loss_of([(ai, 1 - ai) for ai in a])
    on_local = loss_of([(1 - ai, ai) for ai in a])
    assert abs(on_local[0] - expected[0]) > 2e-3, (expected, on_local)
    for c in a:  # a constant weight: either instance's a(x) for both
        constant = loss_of([(c, 1 - c)] * 2)
        assert abs(constant[0] - expected[0]) > 2e-3, (a, expected, constant)  # 10x the tolerance below
    loss, acc = FedDPA.evaluate_model(ctx, tensors)
    assert loss == pytest.approx(expected[0], rel=0, abs=2e-4)
    assert acc == pytest.approx(expected[1])


# --- pFedMoAP -----------------------------------------------------------------------------------------


def test_pfedmoap_runs_on_llm_with_soft_prompt_experts(tmp_path):
    """Two rounds: in the second every speaker gets other speakers' uploaded soft prompts as experts; the
    gate stays on the client; every speaker's perplexity is finite."""
    cfg = load_config(
        None,
        llm_tiny_overrides(
            tmp_path,
            "prompt",
            **{"strategy.name": "pfedmoap", "strategy.num_experts": 2, "run.rounds": 2, "model.llm.generations": 0},
        ),
    )
    t = Spy(cfg)
    summary = run_server(cfg, t, build_strategy(cfg))
    losses = summary["final"]["per_client_loss"]
    assert len(losses) == cfg.run.num_clients and all(math.isfinite(v) for v in losses.values())
    uploads = {p: t.sent[0][p]["prompts"] + r.arrays["delta/prompts"] for p, r in t.received[0].items()}
    for pid, payload in t.sent[1].items():
        assert payload["expert_mask"].all()
        for e in payload["experts"]:
            assert any(np.array_equal(e, u) for p, u in uploads.items() if p != pid)
    assert not any(k.startswith("delta/gate.") for rs in t.received for r in rs.values() for k in r.arrays)
    assert all({"gate.q", "gate.k"} <= set(s) for s in t.states.values())


@pytest.mark.parametrize("name", ["pfedmoap", "pfedmoap_convex"])
def test_pfedmoap_llm_loss_is_the_gated_mixture_of_expert_logits(tmp_path, monkeypatch, name):
    """The reported test loss, written out by hand: the query is the frozen model's own last context state
    (transformers' model, no prompt, the context alone), keys the experts' states at that token, one gate
    per reply, lambda * own logits + the gated mixture of every expert's logits at each reply token; the
    gate's inputs are checked directly (the loss barely moves with the query on a random tiny model).
    Bypassing the mixture (no experts) gives another loss. The convex variant weighs the mixture by
    1 - lambda where the paper's sum weighs it by 1 (and its loss is not the sum's)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from fedpers.client import start_tensors
    from strategies import pfedmoap_llm
    from strategies.pfedmoap import PFedMoAP
    from tests.llm_helpers import tiny_llm_folder

    ctx = _ctx(tmp_path, name, "prompt", **{"strategy.num_experts": 2})
    model, c = ctx.model, ctx.cfg.strategy
    moe_weight = {"pfedmoap": 1.0, "pfedmoap_convex": 1.0 - c.lmbda}[name]
    k, d = ctx.shapes["prompts"]
    g = torch.Generator().manual_seed(0)
    t = start_tensors(ctx, {}, {})
    t.update(PFedMoAP._init_gate(ctx, {}))
    t["experts"] = t["prompts"] + 0.5 * torch.randn(2, k, d, generator=g)
    t["expert_mask"] = torch.ones(2)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llm_folder(), dtype=torch.float32).eval()
    nll = tokens = 0.0
    queries, keys = [], []
    with torch.no_grad():
        for ex in EXAMPLES:
            batch = model.prepare([ex])
            p = int(batch.prompt_lengths[0])
            prompt = torch.tensor([model.chat.prompt_ids(ex["context"])])
            query = hf(input_ids=prompt, output_hidden_states=True).hidden_states[-1][0, -1]
            hs = [model.hidden(batch.ids, batch.mask, {**t, "prompts": pr})[0] for pr in (t["prompts"], *t["experts"])]
            score = torch.stack(
                [c.scaling * F.cosine_similarity(query @ t["gate.q"], h[p - 1] @ t["gate.k"], dim=0) for h in hs]
            )
            queries.append(query)
            keys.append(torch.stack([h[p - 1] for h in hs]))
            w = torch.softmax(score, 0)
            assert w.max() < 0.99  # the gate spreads over the experts
            rows = torch.arange(p - 1, int(batch.lengths[0]) - 1)  # positions predicting the reply's tokens
            logits = c.lmbda * hf.lm_head(hs[0][rows]) + moe_weight * sum(w[e] * hf.lm_head(hs[e][rows]) for e in range(3))
            nll += float(F.cross_entropy(logits, batch.ids[0, rows + 1], reduction="sum"))
            tokens += len(rows)
    seen = []
    real_gate = pfedmoap_llm.gate

    def recording_gate(query, keys, *args):
        seen.append((query.detach().clone(), keys.detach().clone()))
        return real_gate(query, keys, *args)

    monkeypatch.setattr(pfedmoap_llm, "gate", recording_gate)
    strategy = get_strategy_class(name)
    loss, _ = strategy.evaluate_model(ctx, t)
    assert loss == pytest.approx(nll / tokens, rel=0, abs=1e-4)
    # the gate read the frozen model's context state as its query and the experts' as its keys, row by row
    order = torch.argsort(model.prepare(EXAMPLES).lengths, stable=True)  # the evaluation's by_length order
    (got_q, got_k), *_ = seen
    torch.testing.assert_close(got_q, torch.stack(queries)[order], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_k, torch.stack(keys)[order], rtol=1e-4, atol=1e-5)
    # not vacuous: bypassing the mixture (the paper's sum) or summing it (the convex variant) moves the loss
    other = (strategy.evaluate_model(ctx, {**t, "expert_mask": torch.zeros(2)}) if name == "pfedmoap"
             else PFedMoAP.evaluate_model(ctx, t))[0]
    assert abs(other - loss) > 1e-2, (other, loss)


def test_pfedmoap_on_llm_refuses_prefixes_naming_the_field(tmp_path):
    from fedpers.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.adapter.*allowed: prompt"):
        load_config(None, llm_tiny_overrides(tmp_path, "prefix", **{"strategy.name": "pfedmoap"}))


@pytest.mark.parametrize("name", ["pfedmoap", "pfedmoap_convex"])
def test_pfedmoap_llm_generation_decodes_from_the_scored_mixture(tmp_path, monkeypatch, name):
    """The generations' first step gives the same next-token logits as the scored mixture at each reply's
    first token (gate from the context, lambda * own + gated experts), not the own prompt's alone."""
    from fedpers.client import start_tensors
    from strategies.pfedmoap import PFedMoAP

    ctx = _ctx(tmp_path, name, "prompt", **{"strategy.num_experts": 2})
    strategy = get_strategy_class(name)
    model = ctx.model
    k, d = ctx.shapes["prompts"]
    g = torch.Generator().manual_seed(1)
    t = start_tensors(ctx, {}, {})
    t.update(PFedMoAP._init_gate(ctx, {}))
    t["experts"] = t["prompts"] + 0.5 * torch.randn(2, k, d, generator=g)
    t["expert_mask"] = torch.ones(2)
    captured = {}
    monkeypatch.setattr(
        model,
        "generate",
        lambda ex, tensors, max_new_tokens, step_logits: captured.update(step=step_logits) or [""] * len(ex),
    )
    strategy.generate(ctx, t, EXAMPLES)
    prompts = [model.chat.prompt_ids(ex["context"]) for ex in EXAMPLES]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        first = captured["step"](ids, mask, torch.tensor([len(p) - 1 for p in prompts]))
        batch = model.prepare(EXAMPLES)
        scored, _ = strategy._lm_logits(ctx, batch, t)
        own = model.lm_head(model.states(batch, t)[0]).float()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), batch.target[:, 1:].sum(1).cumsum(0)[:-1]])
    torch.testing.assert_close(first.float(), scored[starts], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scored[starts], own[starts], atol=1e-2)


# --- adapters from layer L: the frozen layers below cached, end to end ----------------------------------


def test_late_prompt_runs_are_the_same_with_the_cache_on_or_off(tmp_path):
    """Late prompts through pFedMoAP (own prompt, other speakers' prompts as experts, the gate's query from
    the frozen model): a run whose frozen layers come from the cache equals one that recomputes them for
    every batch (run.cache=false), speaker by speaker."""
    finals = []
    for cache in ("true", "false"):
        cfg = load_config(None, llm_tiny_overrides(
            tmp_path / cache, "prompt", **{"strategy.name": "pfedmoap", "strategy.num_experts": 2, "run.rounds": 2,
                                           "model.llm.generations": 0,
                                          "model.llm.adapter_from_layer": 1, "run.cache": cache}))
        finals.append(run_server(cfg, Spy(cfg), build_strategy(cfg))["final"]["per_client_loss"])
    assert finals[0].keys() == finals[1].keys() and len(finals[0]) == 4
    for k in finals[0]:
        assert finals[0][k] == pytest.approx(finals[1][k], rel=1e-4)
    assert len(set(finals[0].values())) > 1
