"""The fast engine: exact caches and batched multi-client training give the results of the plain path."""

import numpy as np
import pytest
import torch

from fedpers.rounds import batched

from fedpers.models import cache
from fedpers.client import fit, make_context, start_tensors
from fedpers.config import ConfigError
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import build_strategy
from strategies import get_strategy_class

# Uneven clients (Dirichlet; 22-35 train samples each) and small batches: several steps, clients
# running out at different steps. Only the first four partitions train, to keep the tests quick.
SMALL = {"run.num_clients": 30, "run.clients_per_round": 4, "run.engine": "fast", "client.batch_size": 8,
         "client.local_epochs": 2}
PIDS = [0, 1, 2, 3]


def two_rounds(cfg):
    """Replies and final personal states of two rounds on the fast engine."""
    strategy, transport = build_strategy(cfg), InProcessTransport(cfg)
    replies = []
    for rnd in (1, 2):
        payloads = strategy.configure(rnd, PIDS)
        raw = transport.exchange(rnd, payloads, 60.0)
        replies.append(raw)
    return replies, transport.states


def assert_same(a, b, atol):
    (ra, sa), (rb, sb) = a, b
    for rnd_a, rnd_b in zip(ra, rb):
        assert rnd_a.keys() == rnd_b.keys()
        for pid in rnd_a:
            x, y = rnd_a[pid], rnd_b[pid]
            assert x.arrays.keys() == y.arrays.keys() and x.num_examples == y.num_examples
            for k in x.arrays:
                np.testing.assert_allclose(x.arrays[k], y.arrays[k], rtol=0, atol=atol, err_msg=f"{pid} {k}")
            for k in x.metrics:
                assert abs(x.metrics[k] - y.metrics[k]) <= max(atol * 100, 1e-12), (pid, k)
    for pid in sa:
        for k in sa[pid]:
            np.testing.assert_allclose(sa[pid][k], sb[pid][k], rtol=0, atol=atol, err_msg=f"state {pid} {k}")


@pytest.mark.parametrize("strategy", ["pfedpg", "local"])
def test_cached_and_uncached_runs_are_identical(tiny_cfg, strategy):
    cache.process_cache().clear()
    plain = two_rounds(tiny_cfg(**SMALL, **{"run.cache": "false", "strategy.name": strategy}))
    assert cache.process_cache().stats.bytes == 0
    cached = two_rounds(tiny_cfg(**SMALL, **{"strategy.name": strategy}))
    stats = cache.process_cache().stats
    assert stats.hits > 0 and stats.bytes > 0
    assert_same(plain, cached, atol=0)  # same ops on the same rows: bit for bit


def test_head_only_training_uses_frozen_features_exactly(tiny_cfg):
    """With the prompts fixed the backbone's output is computed once; the head trains the same."""
    cache.process_cache().clear()
    out = {}
    for flag in ("false", "true"):
        ctx = make_context(tiny_cfg(**{"run.cache": flag}), 0, 1)
        tensors = start_tensors(ctx, {}, {})
        losses = fit(ctx, tensors, ["head.weight", "head.bias"], epochs=3)
        out[flag] = (tensors, losses)
    assert len(cache.process_cache().features_store) == 1
    for k in out["true"][0]:
        torch.testing.assert_close(out["true"][0][k], out["false"][0][k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["true"][1], out["false"][1], rtol=0, atol=1e-6)


def test_token_cache_keeps_activations_below_the_first_prompted_layer(tiny_cfg):
    """The hook for deep prompts: a model whose prompts enter at block L returns blocks[:L] from embed;
    the cache then holds those activations, and training matches the uncached run."""
    import dataclasses

    from fedpers.bench.support import prompts_from_layer
    from fedpers.client import evaluate

    cache.process_cache().clear()
    out = {}
    deep = None
    for flag in ("false", "true"):
        ctx = make_context(tiny_cfg(**{"run.cache": flag}), 0, 1)
        deep = deep or prompts_from_layer(ctx.model, 3)
        ctx = dataclasses.replace(ctx, model=deep)
        tensors = start_tensors(ctx, {}, {})
        losses = fit(ctx, tensors, list(tensors), epochs=1)
        out[flag] = (tensors, losses, evaluate(ctx, tensors))
    (entry,) = [e for (m, _), e in cache.process_cache().tokens_store.items() if m == id(deep)][:1]
    assert entry.value.shape[1] == 1 + 16  # [cls] + 16 patches after 3 blocks, no prompts yet
    for k in out["true"][0]:
        torch.testing.assert_close(out["true"][0][k], out["false"][0][k], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["true"][1], out["false"][1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["true"][2], out["false"][2], rtol=0, atol=1e-6)


def test_cache_budget_falls_back_to_recomputing(tiny_cfg):
    cache.process_cache().clear()
    a = two_rounds(tiny_cfg(**SMALL, **{"run.cache_mb": 0}))
    assert cache.process_cache().stats.bytes == 0 and cache.process_cache().stats.over_budget > 0
    b = two_rounds(tiny_cfg(**SMALL))
    assert_same(a, b, atol=0)


def test_batched_clients_match_one_at_a_time(tiny_cfg):
    seq = two_rounds(tiny_cfg(**SMALL))
    # A small batch_max_samples also splits the round into several groups.
    for max_samples in (1024, 12):
        both = two_rounds(tiny_cfg(**SMALL, **{"run.batch_clients": "true", "run.batch_max_samples": max_samples}))
        assert_same(seq, both, atol=1e-5)


def test_batched_schedule_is_the_one_fit_draws(tiny_cfg):
    ctx = make_context(tiny_cfg(**SMALL), 1, 3)
    steps = batched.schedule(ctx)
    n, bs = ctx.data.num_train, ctx.cfg.client.batch_size
    assert len(steps) == 2 * -(-n // bs)
    assert sorted(torch.cat(steps[: -(-n // bs)]).tolist()) == list(range(n))


def test_custom_client_objective_is_not_batched(tiny_cfg):
    base = get_strategy_class("fedvpt")
    custom = type("Custom", (base,), {"client_update": classmethod(lambda cls, ctx, r, s: None)})
    ctx = make_context(tiny_cfg(), 0, 1)
    assert batched.supported(base, ctx)
    assert not batched.supported(custom, ctx)


def test_group_clients_respects_max_samples():
    assert batched.group_clients([8, 8, 8, 3], 16) == [[0, 1], [2, 3]]
    assert batched.group_clients([40, 8], 16) == [[0], [1]]  # an oversized client still trains, alone


@pytest.mark.parametrize("overrides, field", [
    ({"run.engine": "flower", "run.batch_clients": "true"}, "run.batch_clients"),
    ({"run.device": "tpu", "run.batch_clients": "true"}, "run.device"),
    ({"run.device": "cuda"}, "run.device"),
    ({"run.engine": "warp"}, "run.engine"),
    ({"run.cache_mb": -1}, "run.cache_mb"),
])
def test_fast_engine_config_errors_name_the_field(tiny_cfg, overrides, field):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(**overrides)
    assert e.value.field == field


def test_cuda_device_is_accepted_by_config(tiny_cfg):
    """Off-CPU training cannot run here (no GPU); the config path and the clear error are what we can test."""
    cfg = tiny_cfg(**{"run.batch_clients": "true", "run.device": "cuda:0"})
    assert cfg.run.device == "cuda:0"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="run.device"):
            batched.device_model(make_context(cfg, 0, 1).model, "cuda:0")


def test_no_cache_when_backbone_weights_are_client_tensors(tiny_cfg):
    """fedavg_full trains the backbone itself: nothing below the head is frozen, so nothing is cached."""
    from fedpers.client import cacheable

    cache.process_cache().clear()
    ctx = make_context(tiny_cfg(**{"strategy.name": "fedavg_full"}), 0, 1)
    tensors = start_tensors(ctx, {}, {})
    assert not cacheable(tensors)
    fit(ctx, tensors, list(tensors), epochs=1)
    assert cache.process_cache().stats.bytes == 0
