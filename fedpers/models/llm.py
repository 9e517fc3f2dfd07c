"""Frozen causal LM with a peft adapter (prompt tuning, prefix tuning or LoRA): the ``llm`` modality.

What is personal is the adapter itself; there is no head (DESIGN.md section 9). The objective is the
next-token loss on the reply's tokens only, the context masked, as in FedIT / OpenFedLLM instruction
tuning. Tensor names follow :mod:`fedpers.models.text` (``prompts`` for prompt and prefix tuning,
peft's LoRA keys without ``base_model.model.`` for LoRA, ``<module>.fold.weight`` residuals), and the
peft plumbing (name mapping, state-dict read/write, adapter export) is PeftTextModel's own, borrowed
method by method, so the two modalities can never name a tensor differently.

The shared model is never mutated by training: every forward runs through ``torch.func.functional_call``
with the client's tensors substituted for the adapter's parameters, so one model per process serves
every simulated client. peft's own forward places the adapter (virtual tokens prepended for prompt
tuning, a key/value cache for prefix tuning, LoRA inside the projections), and the vocabulary
projection, where most of the cost of a small LM lives (49152 x 576 for SmolLM2-135M), runs only at
the positions that predict a target token: the decoder body's output is captured with a forward hook,
the model's own head projects just the last position (``logits_to_keep=1``), and ``lm_head`` is applied
to the gathered rows. A probe at construction checks that this equals the model's own logits, so a
model that post-processes them (soft-capping, scaling) is refused instead of silently mis-scored.

Use::

    model = load_llm("smollm2-135m-instruct", "lora", 10, 8, 16.0, None, 96, 32, "You are a helpful assistant.")
    batch = model.prepare(examples)                     # PreparedBatch, cached per list
    tensors = model.read_tensors()                       # or a client's tensors
    loss = model.lm_loss(batch.select(rows), tensors)    # mean NLL over target tokens, differentiable
    nll, n, correct = model.token_stats(batch, tensors)  # perplexity exp(nll / n), accuracy correct / n
    replies = model.generate(examples[:3], tensors, max_new_tokens=32)

With ``adapter_from_layer=L`` the adapter acts from layer L up: LoRA adapts layers >= L only, or the
soft prompts enter the hidden states at layer L instead of the embeddings ("late" prompts, the
insertion point of Late Prompt Tuning, Liu et al., Findings of EMNLP 2022, section 3: the K vectors are
prepended to the sequence entering layer L; the real tokens below never see them). Either way the
frozen layers below run once per example (:mod:`fedpers.models.llm_split`); select training batches
from ``prepare``'s result with ``select`` / ``by_length`` so they share that cache. In the layers above,
a late prompt takes positions 0..K-1 and the tokens K.. (rotary attention reads only the distance
between positions, so the tokens' geometry among themselves is the one below).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fedpers.models.llm_backbone import load_causal_lm
from fedpers.models.llm_chat import DEFAULT_SYSTEM_PROMPT, ChatFormat, PreparedBatch
from fedpers.models.llm_split import Call, LayerSplit
from fedpers.models.prompted import BackboneError
from fedpers.models.text import FOLD, PEFT_PREFIX, PeftTextModel

__all__ = ["PeftCausalLM", "PreparedBatch", "llm_model_from_config", "llm_peft_config", "load_llm"]

DEFAULT_CONTEXT_TOKENS = 96
DEFAULT_TARGET_TOKENS = 32
TEXT_LORA_TARGETS = ("query", "value")  # the config's default: BERT's module names, absent from decoders


def llm_peft_config(adapter: str, num_prompts: int, r: int, alpha: float, targets: tuple[str, ...] | None,
                    layers: list[int] | None = None):
    """peft configs for a causal LM. Soft prompts start as embeddings of sampled vocabulary tokens
    (peft's SAMPLE_VOCAB): peft's RANDOM init draws N(0, 1) vectors, orders of magnitude larger than an
    LM's token embeddings, which would wreck the frozen model before any training. ``targets=None``
    lets peft pick its per-architecture LoRA default (``q_proj``, ``v_proj`` for Llama); ``layers``
    restricts LoRA to those decoder layers (peft's ``layers_to_transform``)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    task = TaskType.CAUSAL_LM
    if adapter == "prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=num_prompts,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    if adapter == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=num_prompts)
    if adapter == "lora":
        return LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=0.0,
                          target_modules=list(targets) if targets else None, layers_to_transform=layers)
    raise BackboneError(f"model.adapter: unknown adapter {adapter!r}; allowed: prompt, prefix, lora")


class PeftCausalLM(nn.Module):
    modality = "llm"

    # PeftTextModel's peft plumbing, shared verbatim (it reads only self.peft and self._param_of).
    to_name = staticmethod(PeftTextModel.to_name)
    to_peft_key = staticmethod(PeftTextModel.to_peft_key)
    _map_names = PeftTextModel._map_names
    tensor_shapes = PeftTextModel.tensor_shapes
    read_tensors = PeftTextModel.read_tensors
    load_tensors = PeftTextModel.load_tensors
    save_adapter = PeftTextModel.save_adapter
    _frozen_weight = PeftTextModel._frozen_weight

    def __init__(self, base: nn.Module, tokenizer, adapter: str, num_prompts: int = 10, r: int = 8,
                 alpha: float = 16.0, targets: tuple[str, ...] | None = None,
                 context_tokens: int = DEFAULT_CONTEXT_TOKENS, target_tokens: int = DEFAULT_TARGET_TOKENS,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, adapter_from_layer: int = 0,
                 cache_mb: float = 1024.0, share: str | None = None):
        from peft import get_peft_model

        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer, context_tokens, target_tokens, system_prompt)
        layers = None
        depth = int(base.config.get_text_config().num_hidden_layers)
        if adapter_from_layer:
            if adapter not in ("lora", "prompt"):
                raise BackboneError(f"llm.adapter_from_layer={adapter_from_layer} needs model.adapter=lora or prompt, "
                                    f"not {adapter!r} (a prefix acts in every layer)")
            if not 0 < adapter_from_layer < depth:
                raise BackboneError(f"llm.adapter_from_layer must be in 1..{depth - 1}, got {adapter_from_layer}")
            if adapter == "lora":
                layers = list(range(adapter_from_layer, depth))
        try:
            with warnings.catch_warnings():  # peft asks transformers a deprecated gradient-checkpointing question
                warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
                self.peft = get_peft_model(base, llm_peft_config(adapter, num_prompts, r, alpha, targets, layers)).eval()
        except ValueError as e:  # peft: target modules not found in the model
            raise BackboneError(f"model.lora.targets={list(targets or [])}: {e}") from e
        self.adapter = adapter
        self.num_virtual = num_prompts if adapter in ("prompt", "prefix") else 0
        self.embed_dim = int(base.config.get_text_config().hidden_size)
        self.stop_ids = {self.chat.end_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._keep = {"logits_to_keep": 1} if keep else {}  # the head's own projection: one position
        self._param_of = self._map_names()
        self._cache: dict[int, tuple[list, PreparedBatch]] = {}
        # the adapter from layer L up: the frozen layers below run once per example (llm_split)
        self.split = (LayerSplit(base.get_decoder(), adapter_from_layer, cache_mb, share)
                      if adapter_from_layer else None)
        self.late_prompts = self.split is not None and adapter == "prompt"
        self.device = torch.device("cpu")
        self._check_projection()

    def place(self, device: str | torch.device, cache_mb: float | None = None) -> PeftCausalLM:
        """Run the frozen model on ``device`` (``run.device``: cpu | cuda | cuda:N). Client tensors stay
        where the client keeps them (CPU, float32) and are copied in per call, so gradients reach them
        unchanged; batches are copied in per call too. Cached frozen activations are dropped when the
        device changes. ``cache_mb`` (``run.cache_mb``, 0 with ``run.cache=false``) bounds the cache of
        the frozen layers below ``adapter_from_layer``."""
        if cache_mb is not None and self.split is not None:
            self.split.set_budget(cache_mb)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackboneError(f"run.device={str(device)!r} but torch sees no CUDA device; use run.device=cpu")
        if device != self.device:
            self.peft.to(device)
            self.device = device
            if self.split is not None:
                self.split.clear()
        return self

    def train(self, mode: bool = True):  # no dropout: the frozen model is deterministic
        return super().train(False)

    # Reached through self.peft on every call instead of stored: attributes holding modules would
    # register them a second time as submodules of this wrapper.
    @property
    def base(self) -> nn.Module:
        return self.peft.get_base_model()

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    # -- inputs
    def prepare(self, examples: list[dict]) -> PreparedBatch:
        """Examples -> PreparedBatch. Tokenised once per list (federations are cached per process, so
        each client's lists recur every round)."""
        hit = self._cache.get(id(examples))
        if hit is not None and hit[0] is examples:
            return hit[1]
        out = self.chat.batch(examples)
        self._cache[id(examples)] = (examples, out)
        return out

    # -- the forward under a client's tensors
    def _params(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(set(self._param_of) - set(tensors))
        if missing:
            raise KeyError(f"adapter tensors missing: {missing[:3]}{'...' if len(missing) > 3 else ''}")
        dev = self.device
        params = {self._param_of[k]: tensors[k].to(dev) for k in self._param_of}
        # Folded residuals (``<module>.fold.weight``): W0 + fold for this call only (see text.py).
        for k, v in tensors.items():
            if k.endswith(FOLD):
                base = PEFT_PREFIX + k[: -len(FOLD)] + ".base_layer.weight"
                params[base] = self._frozen_weight(base) + v.to(dev)
        return params

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, T) ids and mask -> (N, T, hidden) final hidden states of the real tokens: position t
        predicts token t + 1. Prompt tuning's virtual tokens (prepended by peft) are dropped; prefix
        tuning's live in the key/value cache and never appear here. With adapter_from_layer, the layers
        below L run here too (uncached: for inputs that are not prepared lists, such as generation)."""
        if self.split is not None:
            return self._upper(self.split.frozen(ids, mask), mask.to(self.device), tensors)
        return self._peft_hidden(ids, mask, tensors)

    def _peft_hidden(self, ids: torch.Tensor, mask: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """peft's own forward through every layer, the decoder's output captured."""
        from torch.func import functional_call

        captured = []

        def grab(module, args, out):
            captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

        extra = {} if self.adapter == "prefix" else {"use_cache": False}
        handle = self.base.get_decoder().register_forward_hook(grab)
        try:
            functional_call(self.peft, self._params(tensors), (),
                            {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), **extra,
                             **self._keep}, strict=False)
        finally:
            handle.remove()
        h = captured[-1]
        if self.adapter == "prompt":
            h = h[:, self.num_virtual:]
        if h.shape[1] != ids.shape[1]:
            raise BackboneError(f"decoder returned {h.shape[1]} positions for {ids.shape[1]} tokens")
        return h

    def batch_hidden(self, batch: PreparedBatch, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`hidden` of a prepared batch, through the frozen-layer cache when the adapter starts at
        layer L."""
        if self.split is None:
            return self.hidden(batch.ids, batch.mask, tensors)
        return self._upper(self.split.below(batch), batch.mask.to(self.device), tensors)

    def _upper(self, below: torch.Tensor, mask: torch.Tensor, tensors: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Layers L.. and the final norm on the hidden states entering layer L, under the client's
        adapter (``tensors=None``: the frozen model alone). Late prompts are prepended here and their
        positions dropped from the output; LoRA runs inside the layers' projections."""
        from torch.func import functional_call

        split = self.split
        if tensors is None:
            with self.peft.disable_adapter():
                return split.run(below, mask, split.start, split.depth)
        if self.late_prompts:
            p = tensors["prompts"].to(self.device, below.dtype)
            n, k = below.shape[0], p.shape[0]
            h = torch.cat([p.unsqueeze(0).expand(n, -1, -1), below], dim=1)
            return split.run(h, torch.cat([mask.new_ones((n, k)), mask], dim=1), split.start, split.depth)[:, k:]
        params = {"peft." + k: v for k, v in self._params(tensors).items()}
        upper = Call(self.peft, lambda h, m: split.run(h, m, split.start, split.depth))
        return functional_call(upper, params, (below, mask), strict=False)

    def _target_logits(self, batch: PreparedBatch, tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the positions predicting target tokens only, and those tokens: (M, V), (M,)."""
        h, y, _ = self.states(batch, tensors)
        return self.lm_head(h).float(), y

    def states(self, batch: PreparedBatch, tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass under ``tensors``: the final hidden states at the positions that predict a
        target token (M, hidden), those tokens (M,), and each row's state at its last context token
        (N, hidden), the one that predicts the reply's first token. The model is causal and rows are
        right-padded, so that last one is what the context alone would give."""
        h = self.batch_hidden(batch, tensors)
        pred = batch.target[:, 1:].to(h.device)  # position t predicts token t + 1
        rows = torch.arange(h.shape[0], device=h.device)
        return h[:, :-1][pred], batch.labels[:, 1:].to(h.device)[pred], h[rows, (batch.prompt_lengths - 1).to(h.device)]

    def lm_loss(self, batch: PreparedBatch, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL over the batch's target tokens (token-weighted), differentiable in the
        client's tensors."""
        logits, y = self._target_logits(batch, tensors)
        if y.numel() == 0:
            raise ValueError("batch has no target tokens")
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def frozen_states(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N, hidden) final hidden state of row i at ``positions[i]`` under the frozen model alone: no soft
        prompt, no prefix, no LoRA (the decoder called directly, peft's adapter layers off). With
        ``positions = batch.prompt_lengths - 1``: each row's last context token."""
        if self.split is not None:
            h = self._upper(self.split.frozen(ids, mask), mask.to(self.device), None)
        else:
            with self.peft.disable_adapter():
                out = self.base.get_decoder()(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                              use_cache=False)
            h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return h[torch.arange(h.shape[0], device=h.device), positions.to(h.device)]

    @torch.no_grad()
    def frozen_batch_states(self, batch: PreparedBatch) -> torch.Tensor:
        """:meth:`frozen_states` at each row's last context token, through the frozen-layer cache when
        the adapter starts at layer L."""
        if self.split is None:
            return self.frozen_states(batch.ids, batch.mask, batch.prompt_lengths - 1)
        h = self._upper(self.split.below(batch), batch.mask.to(self.device), None)
        return h[torch.arange(h.shape[0], device=h.device), (batch.prompt_lengths - 1).to(h.device)]

    @torch.no_grad()
    def token_stats(self, batch: PreparedBatch, tensors: dict[str, torch.Tensor]) -> tuple[float, int, int]:
        """``(sum of NLL, target tokens, tokens whose argmax is the target)``: summed over batches,
        perplexity is ``exp(sum_nll / num_tokens)`` and next-token accuracy ``num_correct / num_tokens``."""
        logits, y = self._target_logits(batch, tensors)
        nll = F.cross_entropy(logits, y, reduction="sum")
        return float(nll), int(y.numel()), int((logits.argmax(-1) == y).sum())

    @torch.no_grad()
    def generate(self, examples: list[dict], tensors: dict[str, torch.Tensor], max_new_tokens: int = 32,
                 step_logits=None) -> list[str]:
        """Greedy replies to the examples' contexts under the client's tensors (for the results folder).

        Rows decode together, right-padded: each step runs the full sequences (no key/value cache:
        a few short replies per client) and reads each row's last real position. ``step_logits(ids,
        mask, last)`` -> (N, vocab), the next-token logits at positions ``last``, replaces the single
        model under ``tensors`` for a strategy whose prediction mixes several (its first call sees
        exactly the prompts)."""
        prompts = [self.chat.prompt_ids(ex["context"]) for ex in examples]
        n = len(prompts)
        if n == 0:
            return []
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max()) + max_new_tokens
        ids = torch.full((n, width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        new: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool)
        rows = torch.arange(n)
        for _ in range(max_new_tokens):
            cur = int(lengths.max())
            if step_logits is not None:
                tok = step_logits(ids[:, :cur], mask[:, :cur], lengths - 1).argmax(-1).cpu()
            else:
                h = self.hidden(ids[:, :cur], mask[:, :cur], tensors)[rows.to(self.device), (lengths - 1).to(self.device)]
                tok = self.lm_head(h).argmax(-1).cpu()
            for i in range(n):
                if done[i]:
                    continue
                t = int(tok[i])
                if t in self.stop_ids:
                    done[i] = True
                    continue
                new[i].append(t)
                ids[i, lengths[i]] = t
                mask[i, lengths[i]] = 1
                lengths[i] += 1
            if bool(done.all()):
                break
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]

    def _check_projection(self) -> None:
        """Target-only projection == the model's own logits, once, on a short probe (see module doc)."""
        from torch.func import functional_call

        probe = self.chat.batch([{"context": [{"role": "user", "content": "Hello there."}], "target": "Hi."}])
        tensors = self.read_tensors()
        with torch.no_grad():
            out = functional_call(self.peft, self._params(tensors), (),
                                  {"input_ids": probe.ids, "attention_mask": probe.mask}, strict=False)
            full = out.logits[:, self.num_virtual if self.adapter == "prompt" else 0:].float()
            ours = self.lm_head(self._peft_hidden(probe.ids, probe.mask, tensors)).float()
        if full.shape != ours.shape or not torch.allclose(full, ours, atol=1e-4, rtol=1e-4):
            raise BackboneError(f"model.backbone: {type(self.base).__name__}'s logits are not lm_head(decoder "
                                "output); target-only projection would score it wrongly")
        if self.split is not None:  # cached layers below + the upper run == the frozen model's own forward
            with torch.no_grad(), self.peft.disable_adapter():
                own = self.base(input_ids=probe.ids, attention_mask=probe.mask, use_cache=False).logits.float()
            with torch.no_grad():
                split = self.lm_head(self._upper(self.split.frozen(probe.ids, probe.mask), probe.mask, None)).float()
            if not torch.allclose(own, split, atol=1e-4, rtol=1e-4):
                raise BackboneError(f"llm.adapter_from_layer: {type(self.base).__name__}'s layers do not run like "
                                    "a Llama-style decoder; the frozen-layer cache would change its output")


@functools.lru_cache(maxsize=2)
def load_llm(backbone: str, adapter: str, num_prompts: int, r: int, alpha: float, targets: tuple[str, ...] | None,
             context_tokens: int = DEFAULT_CONTEXT_TOKENS, target_tokens: int = DEFAULT_TARGET_TOKENS,
             system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, adapter_from_layer: int = 0) -> PeftCausalLM:
    """One frozen model per process and adapter configuration; models on one backbone share the cache of
    the frozen layers below ``adapter_from_layer``."""
    base, tokenizer = load_causal_lm(backbone)
    return PeftCausalLM(base, tokenizer, adapter, num_prompts, r, alpha, targets, context_tokens, target_tokens,
                        system_prompt, adapter_from_layer, share=backbone)


def llm_model_from_config(m) -> PeftCausalLM:
    """The model a ``ModelConfig`` describes. Fields read:

    - ``m.backbone`` (``smollm2-135m-instruct``, packaged offline, or any ``from_pretrained`` name/folder),
      ``m.adapter`` (prompt | prefix | lora), ``m.num_prompts``, ``m.lora.r``, ``m.lora.alpha``,
      ``m.lora.targets`` (the config's text default ``["query", "value"]`` names BERT modules, so it
      becomes peft's per-architecture default, ``q_proj`` + ``v_proj`` for Llama);
    - ``m.llm.context_tokens`` (default 96): prompt budget, system prompt and template included;
    - ``m.llm.target_tokens`` (default 32): reply budget, end-of-turn token included;
    - ``m.llm.system_prompt`` (default ``"You are a helpful assistant."``);
    - ``m.llm.adapter_from_layer`` (default 0): the adapter from layer L up (LoRA on layers >= L, or soft
      prompts entering at layer L), the frozen layers below cached; ``m.llm.lora_from_layer``, its
      older LoRA-only name, is read when it is unset.

    The ``m.llm`` fields are read with defaults, so a config without an ``llm`` section works.
    """
    llm = getattr(m, "llm", None)
    targets = tuple(m.lora.targets)
    return load_llm(m.backbone, m.adapter, int(m.num_prompts), int(m.lora.r), float(m.lora.alpha),
                    None if targets == TEXT_LORA_TARGETS else targets,
                    int(getattr(llm, "context_tokens", DEFAULT_CONTEXT_TOKENS)),
                    int(getattr(llm, "target_tokens", DEFAULT_TARGET_TOKENS)),
                    getattr(llm, "system_prompt", DEFAULT_SYSTEM_PROMPT),
                    int(getattr(llm, "adapter_from_layer", 0) or getattr(llm, "lora_from_layer", 0)))
