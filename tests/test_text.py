"""Text modality: peft adapters on the packaged MiniLM, a tiny decoder built here, datasets and config."""

import json

import numpy as np
import pytest
import torch

from fedpers import simulate
from fedpers.config import ConfigError
from fedpers.experiment import load_config
from tests.conftest import text_tiny_overrides, tiny_overrides

SENTENCES = ["the match was great", "a new phone update", "pizza at the local diner", "a trip to the beach"]


def minilm(adapter, **kw):
    from fedpers.models.text import load_text_model

    args = {"num_prompts": 4, "max_length": 12, "r": 8, "alpha": 16.0, "targets": ("query", "value")}
    args.update(kw)
    return load_text_model("all-MiniLM-L6-v2", adapter, args["num_prompts"], args["max_length"], args["r"],
                           args["alpha"], args["targets"])


@pytest.mark.parametrize("adapter, expected", [
    ("prompt", {"prompts": (4, 384)}),
    ("prefix", {"prompts": (4, 6 * 2 * 384)}),
])
def test_prompt_and_prefix_tensors_are_named_prompts(adapter, expected):
    assert minilm(adapter).tensor_shapes() == expected


def test_lora_tensors_are_peft_keys_and_count_matches_peft():
    shapes = minilm("lora").tensor_shapes()
    assert len(shapes) == 6 * 2 * 2
    assert shapes["encoder.layer.0.attention.self.query.lora_A.weight"] == (8, 384)
    assert shapes["encoder.layer.5.attention.self.value.lora_B.weight"] == (384, 8)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 73_728


@pytest.mark.parametrize("adapter", ["prompt", "prefix", "lora"])
def test_tensors_round_trip_through_peft_and_drive_the_features(adapter):
    m = minilm(adapter)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(*s, generator=g) * 0.1 for k, s in m.tensor_shapes().items()}
    m.load_tensors(tensors)
    back = m.read_tensors()
    for k, t in tensors.items():
        torch.testing.assert_close(back[k], t, rtol=0, atol=0)
    batch = m.prepare(SENTENCES)
    assert batch.shape == (4, 2, 12)
    before = {n: p.detach().clone() for n, p in m.peft.named_parameters()}
    for t in tensors.values():
        t.requires_grad_(True)
    feats = m.features_with(batch, tensors)
    assert feats.shape == (4, 384)
    feats.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors.values())
    # The shared model is never touched by training (functional_call), only by load_tensors.
    assert all(torch.equal(p, before[n]) for n, p in m.peft.named_parameters())
    zero = {k: torch.zeros_like(v) for k, v in tensors.items()}
    assert not torch.allclose(m.features_with(batch, zero), feats.detach())


def test_exported_adapter_loads_as_a_standard_peft_checkpoint(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from fedpers.models.text import resolve_backbone

    m = minilm("lora")
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(*s, generator=g) * 0.05 for k, s in m.tensor_shapes().items()}
    m.save_adapter(tensors, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(resolve_backbone("all-MiniLM-L6-v2")),
                                       str(tmp_path / "adapter")).eval()
    batch = m.prepare(SENTENCES)
    with torch.no_grad():
        h = loaded(input_ids=batch[:, 0], attention_mask=batch[:, 1]).last_hidden_state
        mask = batch[:, 1].unsqueeze(-1).float()
        torch.testing.assert_close((h * mask).sum(1) / mask.sum(1), m.features_with(batch, tensors),
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 and a word-level tokenizer without a pad token, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    from fedpers.data.text import make_synthetic_text

    words = sorted({w for t in make_synthetic_text(4, 24)["text"] for w in t.replace(",", " ").split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("adapter, strategy", [("prompt", "pfedpg"), ("prefix", "fedvpt"), ("lora", "fedit")])
def test_decoder_lm_from_a_local_folder_end_to_end(tiny_gpt2, tmp_path, adapter, strategy):
    out = tmp_path / "run"
    code = simulate.main(text_tiny_overrides(out, adapter, **{
        "model.backbone": tiny_gpt2, "model.lora.targets": "[c_attn]", "strategy.name": strategy, "run.rounds": 1}))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    per_client = {"prompt": 4 * 32, "prefix": 4 * 2 * 2 * 32, "lora": 2 * (8 * 32 + 96 * 8)}[adapter]
    assert summary["params"]["up_per_client_round"] == per_client


def test_wrong_lora_targets_is_a_clear_error(tmp_path, capsys):
    code = simulate.main(text_tiny_overrides(tmp_path / "x", "lora", **{"model.lora.targets": "[nope]",
                                                                       "strategy.name": "fedit"}))
    assert code == 2
    assert "model.lora.targets" in capsys.readouterr().err


def test_unknown_hub_model_offline_is_a_clear_error(tmp_path, capsys):
    code = simulate.main(text_tiny_overrides(tmp_path / "x", "prompt", **{"model.backbone": "org/not-a-model"}))
    assert code == 2
    assert "model.backbone" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, field", [
    ({"model.adapter": "lora"}, "model.adapter"),  # vision has prompts only
    ({"strategy.name": "fedit"}, "model.modality"),  # LoRA strategies are text-only
    ({"data.dataset": "synthetic_text"}, "model.modality"),  # data and model modality disagree
    ({"model.modality": "audio"}, "model.modality"),
])
def test_config_errors_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, tiny_overrides(tmp_path, **overrides))
    assert e.value.field == field


def test_lora_strategy_rejects_prompt_adapter(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, text_tiny_overrides(tmp_path, "prompt", **{"strategy.name": "pfedlora_gen"}))
    assert e.value.field == "model.adapter" and "lora" in str(e.value)


def test_hetlora_ranks_above_model_rank_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, text_tiny_overrides(tmp_path, "lora", **{"strategy.name": "hetlora", "model.lora.r": 4}))
    assert e.value.field == "strategy.ranks"
