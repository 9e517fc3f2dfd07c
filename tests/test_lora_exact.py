"""FLoRA and FedEx-LoRA aggregate exactly: the server's model after a round is W0 + s * (weighted mean
of the clients' B_k A_k), which FedIT's product of means is not. Checked on tiny hand-sized factors
(no model needed), then the fold itself on the real text model."""

import numpy as np
import pytest
import torch

from strategies import ClientUpdate, create_strategy, get_config_cls
from strategies.flora import stack

M = "enc.q"
SHAPES = {f"{M}.lora_A.weight": (2, 3), f"{M}.lora_B.weight": (4, 2), "head.weight": (2, 4), "head.bias": (2,)}
A, B = f"{M}.lora_A.weight", f"{M}.lora_B.weight"


def make(name, **fields):
    cfg = get_config_cls(name)(name=name, **fields)
    cfg.validate()
    return create_strategy(cfg, num_clients=3, shapes=SHAPES, seed=0)


def client_factors(rng, r):
    return rng.standard_normal((4, r)), rng.standard_normal((r, 3))


def test_stack_is_the_weighted_sum_of_products_for_any_ranks():
    rng = np.random.default_rng(0)
    factors = [client_factors(rng, r) for r in (1, 2, 3)]
    p = [0.5, 0.3, 0.2]
    b, a = stack(factors, p)
    assert b.shape == (4, 6) and a.shape == (6, 3)  # ranks add up: nothing padded
    np.testing.assert_allclose(b @ a, sum(pk * bk @ ak for pk, (bk, ak) in zip(p, factors)), atol=1e-12)


def test_flora_merges_the_sum_of_client_products_with_heterogeneous_ranks():
    s = make("flora", ranks=[1, 2], weighting="uniform")
    sent = s.configure(1, [0, 1])
    assert sent[0][A].shape == (1, 3) and sent[1][A].shape == (2, 3)  # no padding on the wire
    assert not sent[0][B].any()  # a fresh LoRA each round: B starts at zero
    rng = np.random.default_rng(1)
    ups, products = [], []
    for pid in (0, 1):
        r = sent[pid][A].shape[0]
        b, a = client_factors(rng, r)
        ups.append(ClientUpdate(pid, {A: (a - sent[pid][A]).astype(np.float32), B: b.astype(np.float32)}, 10, {}))
        products.append(b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64))
    s.aggregate(1, ups)
    np.testing.assert_allclose(s.fold[f"{M}.fold.weight"], 0.5 * products[0] + 0.5 * products[1], rtol=1e-5, atol=1e-5)
    # the next round merges on top of this one and hands out new fresh factors
    assert not np.array_equal(s.configure(2, [0])[0][A], sent[0][A])
    np.testing.assert_array_equal(s.configure(2, [0])[0][f"{M}.fold.weight"], s.fold[f"{M}.fold.weight"])


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_fedex_fold_makes_the_global_model_the_mean_of_client_models(weighting):
    s = make("fedex_lora", weighting=weighting)
    start = s.configure(1, [0, 1])[0]
    rng = np.random.default_rng(2)
    ups, products, n = [], [], (10, 30)
    for pid in (0, 1):
        b, a = (x.astype(np.float32) for x in client_factors(rng, 2))
        ups.append(ClientUpdate(pid, {A: a - start[A], B: b - start[B]}, n[pid], {}))
        products.append(b.astype(np.float64) @ a.astype(np.float64))
    w = np.array([0.5, 0.5]) if weighting == "uniform" else np.array(n) / sum(n)
    s.aggregate(1, ups)
    got = s.configure(2, [0])[0]
    global_model = got[f"{M}.fold.weight"].astype(np.float64) + got[B].astype(np.float64) @ got[A].astype(np.float64)
    exact = w[0] * products[0] + w[1] * products[1]
    np.testing.assert_allclose(global_model, exact, rtol=1e-5, atol=1e-5)
    # without the fold (FedIT) the product of the means misses it by a visible margin
    assert np.abs(got[B].astype(np.float64) @ got[A].astype(np.float64) - exact).max() > 0.1


def test_fold_is_added_to_the_frozen_weight_for_one_call_only():
    """A fold F on a module gives the model W0 + F there: the same features as a LoRA with s*B@A = F."""
    from fedpers.models.text import load_text_model

    model = load_text_model("all-MiniLM-L6-v2", "lora", 4, 16, 8, 16.0, ("query", "value"))
    shapes = model.tensor_shapes()
    g = torch.Generator().manual_seed(0)
    zero = {k: torch.zeros(v) for k, v in shapes.items()}
    q = "encoder.layer.0.attention.self.query"
    a = torch.randn(8, shapes[q + ".lora_A.weight"][1], generator=g) * 0.1
    b = torch.randn(shapes[q + ".lora_B.weight"][0], 8, generator=g) * 0.1
    lora = {**zero, q + ".lora_A.weight": a, q + ".lora_B.weight": b}
    folded = {**zero, q + ".fold.weight": 2.0 * (b @ a)}  # scaling alpha / r = 16 / 8
    batch = model.prepare(["a short text", "another one here"])
    with torch.no_grad():
        f_lora, f_fold, f_plain = (model.features_with(batch, t) for t in (lora, folded, zero))
    torch.testing.assert_close(f_fold, f_lora, rtol=1e-4, atol=1e-5)
    assert (f_fold - f_plain).abs().max() > 1e-3
    with torch.no_grad():  # the shared model was not mutated
        torch.testing.assert_close(model.features_with(batch, zero), f_plain)


def test_fedex_default_is_the_papers_uniform_mean_whatever_the_client_sizes():
    """The official code averages A, B and B_k A_k with equal weights (fedex-lora fed_agg.py 95-100), so the
    default must ignore num_examples: three clients with 1, 10 and 100 examples, aggregated by hand."""
    s = make("fedex_lora")
    assert s.config.weighting == "uniform"
    sent = s.configure(1, [0, 1, 2])[0]
    rng = np.random.default_rng(5)
    trained = [client_factors(rng, 2) for _ in range(3)]  # (B_k, A_k)
    s.aggregate(1, [ClientUpdate(p, {A: (a - sent[A]).astype(np.float32), B: (b - sent[B]).astype(np.float32)}, n, {})
                    for p, ((b, a), n) in enumerate(zip(trained, (1, 10, 100)))])
    b_mean = (trained[0][0] + trained[1][0] + trained[2][0]) / 3
    a_mean = (trained[0][1] + trained[1][1] + trained[2][1]) / 3
    np.testing.assert_allclose(s.shared.tensors[A], a_mean, atol=1e-5)
    np.testing.assert_allclose(s.shared.tensors[B], b_mean, atol=1e-5)
    mean_product = (trained[0][0] @ trained[0][1] + trained[1][0] @ trained[1][1] + trained[2][0] @ trained[2][1]) / 3
    np.testing.assert_allclose(s.fold[f"{M}.fold.weight"], mean_product - b_mean @ a_mean, atol=1e-4)
