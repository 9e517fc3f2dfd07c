"""The causal-LM blocks of a client's round (``model.modality=llm``): the mini-batch loss that
:func:`fedpers.client.fit`'s one training loop runs for a causal LM, token-weighted scoring and the greedy
generations written after the last round (:mod:`fedpers.client` re-exports the last two)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedpers.client import ClientContext


def lm_batch_loss(ctx: ClientContext) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """A causal LM's mini-batch loss: the next-token loss on the reply tokens only (the context masked)."""
    prepared = ctx.model.prepare(ctx.data.x_train)
    return lambda idx, used: ctx.model.lm_loss(prepared.select(idx), used)


@torch.no_grad()
def lm_scores(ctx: ClientContext, tensors: dict[str, torch.Tensor], examples: list | None = None,
              prepared=None) -> tuple[float, float, int]:
    """(mean NLL per target token, next-token accuracy, target tokens) of a causal LM client on its
    test split (or ``examples``). Token-weighted: perplexity is ``exp`` of the first number."""
    batch = prepared if prepared is not None else ctx.model.prepare(ctx.data.x_test if examples is None else examples)
    nll = tokens = correct = 0
    for part in batch.by_length(max(1, ctx.cfg.client.batch_size)):
        a, n, c = ctx.model.token_stats(part, tensors)
        nll, tokens, correct = nll + a, tokens + n, correct + c
    if tokens == 0:
        return float("nan"), float("nan"), 0
    return float(nll / tokens), float(correct / tokens), int(tokens)


def write_generations(ctx: ClientContext, tensors: dict[str, torch.Tensor], examples: list | None = None,
                      generate: Callable[[list], list[str]] | None = None) -> None:
    """Greedy replies of a causal-LM client to its first ``model.llm.generations`` test examples, written
    (context, reference, generated) to ``<output_dir>/generations/client_<id>.jsonl`` from the last
    training round on, so a reader sees what personalization does to each speaker's replies. Simulation
    only: a deployed client's results folder is not the server's."""
    import json
    from pathlib import Path

    m = ctx.cfg.model.llm
    if m.generations <= 0 or ctx.server_round < ctx.cfg.run.rounds:
        return
    out = Path(ctx.cfg.run.output_dir)
    if not out.is_dir():
        return
    chosen = (ctx.data.x_test if examples is None else examples)[: m.generations]
    replies = (generate(list(chosen)) if generate is not None
               else ctx.model.generate(list(chosen), tensors, max_new_tokens=m.max_new_tokens))
    folder = out / "generations"
    folder.mkdir(exist_ok=True)
    rows = [{"round": ctx.server_round, "context": e["context"], "reference": e["target"], "generated": r}
            for e, r in zip(chosen, replies)]
    tmp = folder / f".client_{ctx.partition_id}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(folder / f"client_{ctx.partition_id}.jsonl")
