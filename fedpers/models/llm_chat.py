"""Conversation examples -> token ids through the tokenizer's chat template, within fixed budgets.

An example is ``{"context": [{"role": "user" | "assistant", "content": str}, ...], "target": str}``:
the turns before a speaker's reply (normally ending with the other speaker, role ``user``) and the
reply itself, which is the assistant turn the model learns. A row is

    prompt = template(system + context, add_generation_prompt=True)   at most ``context_tokens`` ids
    target = reply ids + the template's end-of-turn id                at most ``target_tokens`` ids

Only the target is learned (DESIGN.md section 9). The prompt keeps the most recent turns that fit,
whole; when even the last turn alone does not fit, its content is cut from the left, so the prompt
always ends with the tokens right before the reply and never exceeds the budget. A reply longer than
its budget is cut on the right and then has no end-of-turn id: a cut reply followed by "end of turn"
would teach the model to stop mid-sentence.

A short system prompt is always sent: templates such as SmolLM2's inject a long default system turn
("You are a helpful AI assistant named SmolLM, trained by Hugging Face") whenever the first message is
not a system one, which would spend a third of a small context budget on every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedpers.models.prompted import BackboneError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
_SENTINEL = "FEDPERS_CONTENT_9f3b7c"  # content placeholder: plain ASCII no template rewrites


@dataclass(frozen=True)
class PreparedBatch:
    """Right-padded rows ``prompt + target``. ``labels`` holds the ids at target positions and -100
    elsewhere; the objective reads labels only where ``target`` is True, so context positions can
    never leak into the loss. ``lengths`` lets a sub-batch be trimmed to its longest row."""

    ids: torch.Tensor  # (N, T) int64 input ids, pad id after each row's end
    mask: torch.Tensor  # (N, T) int64 attention mask (1 on real tokens)
    target: torch.Tensor  # (N, T) bool, True on the reply's tokens
    labels: torch.Tensor  # (N, T) int64, ids on target positions, -100 elsewhere
    lengths: torch.Tensor  # (N,) int64 real tokens per row
    prompt_lengths: torch.Tensor  # (N,) int64 tokens before the reply
    # (prepared batch, row indices) this one was selected from: caches of frozen activations key on it
    source: tuple | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_target_tokens(self) -> int:
        return int(self.target.sum())

    def select(self, rows) -> PreparedBatch:
        """Rows ``rows`` (indices or a bool mask), trimmed to the longest of them."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        lengths = self.lengths[rows]
        width = int(lengths.max()) if lengths.numel() else 0
        parent, origin = self.source if self.source is not None else (self, None)
        return PreparedBatch(self.ids[rows, :width], self.mask[rows, :width], self.target[rows, :width],
                             self.labels[rows, :width], lengths, self.prompt_lengths[rows],
                             source=(parent, rows if origin is None else origin[rows]))

    def by_length(self, batch_size: int) -> list[PreparedBatch]:
        """Sub-batches of rows of similar length (sorted), so little compute goes to padding."""
        order = torch.argsort(self.lengths, stable=True)
        return [self.select(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


class ChatFormat:
    """The tokenizer's chat template, measured once: its fixed cost, its end-of-turn id, and the ids
    of a prompt under the budget."""

    def __init__(self, tokenizer, context_tokens: int, target_tokens: int,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT):
        if not getattr(tokenizer, "chat_template", None):
            raise BackboneError("model.backbone: the tokenizer has no chat template; use an instruction-tuned "
                                "model (e.g. smollm2-135m-instruct)")
        if target_tokens < 1:
            raise BackboneError(f"llm.target_tokens must be >= 1, got {target_tokens}")
        self.tokenizer = tokenizer
        self.context_tokens = int(context_tokens)
        self.target_tokens = int(target_tokens)
        self.system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        self.end_id = self._end_of_turn_id()
        pre, post = self._split([{"role": "user", "content": _SENTINEL}])
        self.fixed_tokens = len(pre) + len(post)  # template + system prompt around one user turn
        if self.context_tokens < self.fixed_tokens + 1:
            raise BackboneError(
                f"llm.context_tokens={self.context_tokens} cannot hold the chat template's {self.fixed_tokens} "
                f"fixed tokens (system prompt, role markers, generation prompt) plus one context token; "
                f"use at least {self.fixed_tokens + 1} or a shorter llm.system_prompt")

    def encode(self, text: str) -> list[int]:
        # templates write their own special tokens (BOS included), as apply_chat_template's tokenize does
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, turns: list[dict], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(self.system + list(turns), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _split(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """Ids before and after the sentinel content of the last turn (generation prompt included)."""
        text = self.render(turns)
        at = text.rfind(_SENTINEL)
        if at < 0:
            raise BackboneError("model.backbone: the chat template drops message contents")
        return self.encode(text[:at]), self.encode(text[at + len(_SENTINEL):])

    def _end_of_turn_id(self) -> int:
        """The first id the template writes after an assistant turn's content (``<|im_end|>`` for ChatML,
        ``<|eot_id|>`` for Llama 3); the EOS id when the template writes nothing there."""
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.render(turns, generation_prompt=False)
        at = text.rfind(_SENTINEL)
        after = self.encode(text[at + len(_SENTINEL):].lstrip(" ")) if at >= 0 else []
        if after:
            return int(after[0])
        if self.tokenizer.eos_token_id is None:
            raise BackboneError("model.backbone: the chat template ends no turn and the tokenizer has no EOS token")
        return int(self.tokenizer.eos_token_id)

    def prompt_ids(self, context: list[dict]) -> list[int]:
        """The most recent context within ``context_tokens``: whole turns while they fit, else the last
        turn's content cut from the left."""
        best = None
        for start in range(len(context) - 1, -1, -1):
            ids = self.encode(self.render(context[start:]))
            if len(ids) > self.context_tokens:
                break
            best = ids
        if best is not None:
            return best
        if not context:
            ids = self.encode(self.render([]))
            if len(ids) > self.context_tokens:
                raise BackboneError(f"llm.context_tokens={self.context_tokens} cannot hold the system prompt")
            return ids
        last = context[-1]
        pre, post = self._split([{"role": last["role"], "content": _SENTINEL}])
        room = self.context_tokens - len(pre) - len(post)
        if room < 1:
            raise BackboneError(f"llm.context_tokens={self.context_tokens} cannot hold the chat template's "
                                f"{len(pre) + len(post)} fixed tokens plus one context token")
        return pre + self.encode(last["content"])[-room:] + post

    def target_ids(self, reply: str) -> list[int]:
        ids = self.encode(reply)
        if len(ids) + 1 <= self.target_tokens:
            return ids + [self.end_id]
        return ids[: self.target_tokens]

    def batch(self, examples: list[dict]) -> PreparedBatch:
        rows, prompts = [], []
        for ex in examples:
            p = self.prompt_ids(ex["context"])
            rows.append(p + self.target_ids(ex["target"]))
            prompts.append(len(p))
        n, width = len(rows), max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((n, width), int(pad if pad is not None else self.end_id), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        target = torch.zeros((n, width), dtype=torch.bool)
        for i, (row, p) in enumerate(zip(rows, prompts)):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
            target[i, p: len(row)] = True
        labels = ids.masked_fill(~target, -100)
        return PreparedBatch(ids, mask, target, labels, mask.sum(1), torch.tensor(prompts, dtype=torch.long))
