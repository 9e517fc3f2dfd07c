"""The GPU path: batched multi-client training on ``run.device`` (``FEDPERS_TEST_DEVICE``, default cuda).

Skipped where torch sees no CUDA device (CI has none); ``python -m fedpers.gpu_check`` (and
``scripts/gpu_check.sh``) runs them on a GPU machine. With ``FEDPERS_TEST_DEVICE=cpu`` they run on the
CPU too, which is how the file itself is checked on a machine without a GPU.
"""

import os

import numpy as np
import pytest
import torch

from fedpers.rounds import batched
from fedpers.client import make_context
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import build_strategy
from tests.test_fast_engine import SMALL, two_rounds

DEVICE = os.environ.get("FEDPERS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device (set FEDPERS_TEST_DEVICE=cpu to run these on the CPU)")

# TF32 convolutions (cuDNN's default) round the patch embedding to ~1e-3 relative; the prompts' and
# head's deltas then agree to about that. A wrong device path (another batch, a missing client's
# rows, a head not trained) is off by far more than this.
ATOL = 2e-3 if DEVICE.startswith("cuda") else 1e-5


def test_batched_on_device_equals_one_client_at_a_time_on_cpu(tiny_cfg):
    seq = two_rounds(tiny_cfg(**SMALL))
    dev = two_rounds(tiny_cfg(**SMALL, **{"run.batch_clients": "true", "run.device": DEVICE}))
    (rs, ss), (rd, sd) = seq, dev
    for rnd_s, rnd_d in zip(rs, rd):
        assert rnd_s.keys() == rnd_d.keys()
        for pid in rnd_s:
            assert rnd_s[pid].num_examples == rnd_d[pid].num_examples
            for k in rnd_s[pid].arrays:
                np.testing.assert_allclose(rnd_d[pid].arrays[k], rnd_s[pid].arrays[k], rtol=0, atol=ATOL,
                                           err_msg=f"client {pid} {k}")
            assert abs(rnd_d[pid].metrics["test_loss"] - rnd_s[pid].metrics["test_loss"]) < 50 * ATOL
    for pid in ss:
        for k in ss[pid]:
            assert isinstance(sd[pid][k], np.ndarray)  # personal state comes back to host memory
            np.testing.assert_allclose(sd[pid][k], ss[pid][k], rtol=0, atol=ATOL, err_msg=f"state {pid} {k}")


def test_device_copy_leaves_the_shared_cpu_backbone_alone(tiny_cfg):
    cfg = tiny_cfg(**SMALL, **{"run.batch_clients": "true", "run.device": DEVICE})
    model = make_context(cfg, 0, 1).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dev = batched.device_model(model, DEVICE)
    assert batched.device_model(model, DEVICE) is dev  # made once per process
    assert next(dev.parameters()).device.type == torch.device(DEVICE).type
    assert next(model.parameters()).device.type == "cpu"
    two_rounds(cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # frozen: training on the device moved nothing
    assert not any(p.requires_grad for p in dev.parameters())


@pytest.mark.slow
def test_vit_b16_batched_round_on_device(tmp_path):
    """A real-size backbone (timm vit_base_patch16_224, random init, 224 px) through the batched trainer:
    every sampled client replies with finite deltas of the right shape, and the prompts are trained
    (their delta is not a multiple of the prompts, which is all weight decay alone would give)."""
    from fedpers.experiment import load_config
    from fedpers.bench.gpu_check import vit_b16_overrides

    cfg = load_config(None, vit_b16_overrides(DEVICE, 2, tmp_path / "out"))
    strategy = build_strategy(cfg)
    payloads = strategy.configure(1, [0, 1])
    replies = InProcessTransport(cfg).exchange(1, payloads, 600.0)
    for reply in replies.values():
        delta = reply.arrays["delta/prompts"]
        assert delta.shape == (cfg.model.num_prompts, 768)
        assert np.isfinite(delta).all()
        p = payloads[reply.partition_id]["prompts"].ravel()
        cos = float(delta.ravel() @ p / (np.linalg.norm(delta) * np.linalg.norm(p)))
        assert abs(cos) < 0.99
