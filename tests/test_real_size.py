"""The paper-size path on CPU: timm's ViT-B/16 at 224 px, and timm's own pretrained-weights loading.

Slow (a ViT-B/16 forward/backward at 224 px on CPU, and a 344 MB weights file), hence marked; they are what
a user with internet and the paper's backbone runs, minus the download.
"""

import json

import numpy as np
import pytest
import torch

from fedpers import simulate
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

VIT_B = "vit_base_patch16_224"


def _vit_b_overrides(out, strategy: str, **extra) -> list[str]:
    # 2 clients x 4 digits (8x8, upsampled to 224 px and 3 channels by the backbone's prepare).
    return tiny_overrides(out, **{
        "strategy.name": strategy, "run.num_clients": 2, "run.clients_per_round": 2, "run.rounds": 1,
        "data.partitioner.name": "size", "data.partitioner.partition_sizes": "[4,4]", "data.test_fraction": 0.25,
        "model.backbone": VIT_B, "model.pretrained": "false", "client.batch_size": 4,
        "run.max_upload_mb": 1024, "run.cache": "false", **extra})


@pytest.mark.parametrize("strategy", ["pfedpg", "fedvpt_deep", "fedavg_full"])
def test_vit_b16_at_224_runs_one_round(tmp_path, strategy):
    import timm

    out = tmp_path / strategy
    # fedavg_full refuses backbones past 10M weights by default (a guard against accidental 344 MB rounds).
    extra = {"strategy.max_backbone_params": 100_000_000} if strategy == "fedavg_full" else {}
    assert simulate.main(_vit_b_overrides(out, strategy, **extra)) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 1 and s["skipped_rounds"] == [] and s["failures"] == 0
    assert sorted(s["final"]["per_client"]) == ["0", "1"]
    assert all(np.isfinite(v) for v in s["final"]["per_client"].values())
    # What crosses the network is the real-size tensor: K=10 prompts of width 768, per layer for
    # fedvpt_deep, and the whole 86M-parameter backbone (plus the shared head) for fedavg_full.
    vit = timm.create_model(VIT_B, pretrained=False, num_classes=0)
    width, depth, n_backbone = vit.embed_dim, len(vit.blocks), sum(p.numel() for p in vit.parameters())
    down = s["params"]["down_per_client_round"]
    if strategy == "pfedpg":
        assert down == 10 * width
    elif strategy == "fedvpt_deep":
        assert down == depth * 10 * width
    else:
        assert n_backbone <= down <= n_backbone + 10 * width + 10 * (width + 1) + 1000


def test_pretrained_true_loads_a_local_file_through_timms_own_loader(tmp_path, monkeypatch):
    """``model.pretrained=true`` goes through ``timm.create_model(pretrained=True)``: the registry's
    pretrained cfg, timm's ``load_pretrained`` (head dropped for num_classes=0, the cfg's mean/std). Only
    the source is swapped: the default cfg's ``file`` points at a local copy instead of the hub."""
    import dataclasses

    import timm
    from safetensors.torch import save_file
    from timm.models import _registry

    from fedpers.models.prompted import load_backbone

    torch.manual_seed(0)
    src = timm.create_model(VIT_B, pretrained=False)  # with its 1000-class head, like the hub file
    weights = tmp_path / "vit_b16.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    cfg = timm.models.get_pretrained_cfg(VIT_B)
    # The registry keeps the default cfg under the bare name and under name.tag: point both at the file.
    for key in (VIT_B, f"{cfg.architecture}.{cfg.tag}"):
        if key in _registry._model_pretrained_cfgs:
            monkeypatch.setitem(_registry._model_pretrained_cfgs, key, dataclasses.replace(cfg, file=str(weights)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_backbone.cache_clear()
    try:
        model = load_backbone(VIT_B, True, None, None)
        got = model.vit.state_dict()
        assert "head.weight" not in got or got["head.weight"].numel() == 0
        for name in ("patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "pos_embed"):
            torch.testing.assert_close(got[name], src.state_dict()[name], rtol=0, atol=0)
        np.testing.assert_allclose(model.mean.flatten().tolist(), cfg.mean, rtol=1e-6)
        out = tmp_path / "run"
        assert simulate.main(_vit_b_overrides(out, "pfedpg", **{"model.pretrained": "true"})) == 0
    finally:
        load_backbone.cache_clear()
