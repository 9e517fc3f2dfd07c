"""The two references every LLM-personalization paper reports beside its trained methods
(``model.modality=llm``; DESIGN.md section 9). Neither trains nor sends anything.

- ``zero_shot``: the frozen model as it is. With ``model.adapter=lora`` the adapter is peft's
  initialisation (B = 0), so the client's model *is* the frozen model, exactly; soft prompts and
  prefixes always change the model, so they are refused.
- ``in_context``: in-context personalization, the retrieval-free form of the LaMP line of work's
  baseline (Salemi et al., "LaMP: When Large Language Models Meet Personalization", 2023, which puts
  a user's own profile items into the prompt): ``strategy.k`` of the speaker's own training examples
  (context turn, then the speaker's reply) are placed before each test example's context, and the
  frozen model is scored on the reply. The examples are a seeded draw per client (fixed across rounds,
  not retrieved by similarity), and the prompt budget is ``strategy.context_tokens``, not
  ``model.llm.context_tokens``: the most recent whole turns that fit are kept, so the test example's
  own context always survives and the oldest in-context examples go first.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpers.errors import ConfigError
from strategies.base import ClientUpdate, Strategy, StrategyConfig, register_strategy


@dataclass
class ZeroShotConfig(StrategyConfig):
    name: str = "zero_shot"

    def validate_with(self, cfg) -> None:
        if cfg.model.adapter != "lora":
            raise ConfigError("model.adapter", "zero_shot scores the frozen model: it needs model.adapter=lora "
                                               f"(B = 0 leaves the model unchanged), not {cfg.model.adapter!r}")


@dataclass
class InContextConfig(ZeroShotConfig):
    name: str = "in_context"
    k: int = 4  # the speaker's own training examples placed in the prompt before each test example
    context_tokens: int = 384  # prompt budget with the in-context examples (system prompt and template included)

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError("strategy.k", f"must be >= 1, got {self.k}")
        if self.context_tokens < 8:
            raise ConfigError("strategy.context_tokens", f"must be >= 8, got {self.context_tokens}")


class _Reference(Strategy):
    sends = ()
    personal = ()
    modalities = ("llm",)
    adapters = ("lora",)

    @classmethod
    def tensor_roles(cls, shapes):
        return (), ()

    def configure(self, server_round, partition_ids):
        return {pid: {} for pid in partition_ids}

    def aggregate(self, server_round, updates: list[ClientUpdate]):
        return {}

    @classmethod
    def client_update(cls, ctx, received, state):
        from fedpers.client import finish, lm_scores, start_tensors

        tensors = start_tensors(ctx, {}, {})  # LoRA B = 0: the frozen model
        train_loss = lm_scores(ctx, tensors, ctx.data.x_train)[0]  # nothing trains: the frozen model's loss there
        return finish(ctx, (), (), received, tensors, [train_loss], eval_result=cls.scores(ctx, tensors), local_steps=0)

    @classmethod
    def scores(cls, ctx, tensors) -> tuple[float, float]:
        from fedpers.client import evaluate

        return evaluate(ctx, tensors)

    @classmethod
    def evaluate_model(cls, ctx, tensors) -> tuple[float, float]:
        """The reference's own scoring (in-context: the shots in the prompt), for validation and the
        cross-evaluation alike."""
        return cls.scores(ctx, tensors)


@register_strategy
class ZeroShot(_Reference):
    name = "zero_shot"
    summary = "llm reference: the frozen model, no training, nothing sent"
    config_cls = ZeroShotConfig


def with_examples(shots: list[dict], example: dict) -> dict:
    """``example`` with ``shots`` (each a context and the speaker's reply) as earlier turns."""
    turns: list[dict] = []
    for s in shots:
        turns += [*s["context"], {"role": "assistant", "content": s["target"]}]
    return {"context": turns + list(example["context"]), "target": example["target"]}


@register_strategy
class InContext(_Reference):
    name = "in_context"
    summary = "llm reference: k of the speaker's own examples in the prompt, frozen model, nothing sent"
    config_cls = InContextConfig

    @classmethod
    def scores(cls, ctx, tensors) -> tuple[float, float]:
        import torch

        from fedpers.client import lm_scores

        c = ctx.cfg.strategy
        g = torch.Generator().manual_seed(ctx.cfg.run.seed * 1_000_003 + ctx.partition_id)  # fixed across rounds
        pick = torch.randperm(ctx.data.num_train, generator=g)[: c.k].tolist()
        shots = [ctx.data.x_train[i] for i in pick]
        examples = [with_examples(shots, e) for e in ctx.data.x_test]
        chat = ctx.model.chat
        system = chat.system[0]["content"] if chat.system else None
        longer = type(chat)(ctx.model.tokenizer, c.context_tokens, chat.target_tokens, system)
        loss, acc, _ = lm_scores(ctx, tensors, prepared=longer.batch(examples))
        return loss, acc
