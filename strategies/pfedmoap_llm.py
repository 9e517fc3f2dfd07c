"""pFedMoAP's client side on a causal LM (``model.modality=llm``): the expert mixture, its training
loop, scoring and greedy generation. :class:`strategies.pfedmoap.PFedMoAP` mixes this in; the server side,
the expert selection and the vision/text client are in ``strategies/pfedmoap.py``.

On a causal LM (``model.modality=llm``, ``model.adapter=prompt``) the experts are soft prompts (K x hidden)
and there is no head: the classifier is the frozen model's ``lm_head``. For a row x = (context, reply):

    h_e(x, t) = final hidden state at position t under soft prompt e      (e = 0 own, 1..K experts)
    c(x)      = the frozen model's (no soft prompt) final hidden state at the context's last token
    k_e(x)    = h_e(x, p - 1), expert e's state at that same token (p: context length)
    g(x)      = softmax_e( scaling * cos(c(x) W_q, k_e(x) W_k) )           (one weight per expert and reply)
    logits(t) = lambda * lm_head(h_0(x, t)) + lm_head( sum_e g_e(x) h_e(x, t) )

at every position t that predicts a reply token, trained and scored with the next-token loss on the
reply only. lm_head is affine and the g_e sum to 1, so the second term is the g-weighted mixture of the
experts' own next-token logits: the gate mixes the experts' outputs. Where this departs from the paper's
CLIP setting: there a prompt changes only the text side (per-class text features, the same for every
image) and the query is the frozen image encoder's feature; here a prompt changes the model's reading of
the input itself, so the experts' outputs are input-dependent hidden states. The query keeps the paper's
role: a representation of the input that no prompt touches (the frozen model's own state where the
reply starts, computed without grad); the keys are the experts' states at that token, and the gate is
fixed per reply from its context (CLIP's gate is per image and class; a causal LM has no classes, and a
per-token gate would let the reply's own tokens steer the mixture that scores them). Generations
(``model.llm.generations``) decode greedily from the same mixture, the gate set once from the context.
Cost: K + 2 forward passes per batch (own prompt, K experts, the frozen query). Prefix tuning is refused
on ``llm`` (the experts here are soft prompts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gate(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, t: dict[str, torch.Tensor], scaling: float):
    """(N, K+1) softmax over the own expert and the real ones (``mask`` (K,)) of scaling * cos(q W_q, k_e W_k);
    query (N, D), keys (N, K+1, D)."""
    dev = query.device
    q = F.normalize(query @ t["gate.q"].to(dev), dim=-1)
    k = F.normalize(keys @ t["gate.k"].to(dev), dim=-1)
    score = scaling * torch.einsum("nd,ned->ne", q, k)
    keep = torch.cat([torch.ones(1, dtype=torch.bool), mask.bool()]).to(dev)
    return torch.softmax(score.masked_fill(~keep, -math.inf), dim=1)


class LLMMixture:
    """The LLM half of pFedMoAP's client (see the module docstring). The class it is mixed into provides
    ``weights(config) -> (local, mixture)`` and ``sends`` / ``tensor_roles``."""

    @classmethod
    def _lm_logits(cls, ctx, batch, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, vocab) logits at the positions predicting the reply tokens of ``batch``, and those tokens."""
        c, model = ctx.cfg.strategy, ctx.model
        own, y, own_ctx = model.states(batch, t)
        local = model.lm_head(own).float()
        mask = t["expert_mask"]
        if not bool(mask.any()):  # no expert yet: the local logits alone (official forward's else branch)
            return local, y
        hs, keys = [own], [own_ctx]
        with torch.no_grad():  # experts are frozen
            for e in range(mask.shape[0]):
                if mask[e] > 0:
                    h, _, k = model.states(batch, {**t, "prompts": t["experts"][e]})
                else:
                    h, k = torch.zeros_like(own), torch.zeros_like(own_ctx)
                hs.append(h)
                keys.append(k)
        query = model.frozen_batch_states(batch)  # through the frozen-layer cache when prompts enter late
        g = gate(query, torch.stack(keys, 1), mask, t, float(c.scaling))  # (N, K+1), one row per reply
        row = batch.target[:, 1:].nonzero(as_tuple=True)[0].to(own.device)  # the reply of each target position
        mixed = torch.einsum("me,emd->md", g[row], torch.stack(hs))
        lam, w = cls.weights(c)
        return lam * local + w * model.lm_head(mixed).float(), y

    @classmethod
    def client_update_llm(cls, ctx, received, tensors, trainable):
        """Same batches, optimizer and budget as ``fedpers.client.fit``; the forward is the mixture."""
        from fedpers.client import finish, local_budget, local_optimizer

        cc = ctx.cfg.client
        for k in trainable:
            tensors[k].requires_grad_(True)
        opt = local_optimizer([tensors[k] for k in trainable], cc)
        g, prepared, n, losses = ctx.generator(), ctx.model.prepare(ctx.data.x_train), ctx.data.num_train, []
        while len(losses) < local_budget(ctx):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, cc.batch_size):
                if len(losses) == local_budget(ctx):
                    break
                logits, y = cls._lm_logits(ctx, prepared.select(order[i : i + cc.batch_size]), tensors)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        tensors = {k: v.detach() for k, v in tensors.items()}
        return finish(ctx, cls.sends, cls.tensor_roles(ctx.shapes)[1], received, tensors, losses,
                      eval_result=cls.evaluate_model(ctx, tensors), generate=lambda ex: cls.generate(ctx, tensors, ex))

    @classmethod
    @torch.no_grad()
    def evaluate_llm(cls, ctx, tensors) -> tuple[float, float]:
        """Token-weighted NLL and next-token accuracy of the mixture on the client's test replies."""
        nll = tokens = correct = 0
        for part in ctx.model.prepare(ctx.data.x_test).by_length(max(1, ctx.cfg.client.batch_size)):
            logits, y = cls._lm_logits(ctx, part, tensors)
            nll += float(F.cross_entropy(logits, y, reduction="sum"))
            tokens, correct = tokens + int(y.numel()), correct + int((logits.argmax(-1) == y).sum())
        if tokens == 0:
            return float("nan"), float("nan")
        return nll / tokens, correct / tokens

    @classmethod
    @torch.no_grad()
    def generate(cls, ctx, t, examples: list) -> list[str]:
        """Greedy replies from the mixture; the gate is set at the first step, from the context alone."""
        c, model, mask = ctx.cfg.strategy, ctx.model, t["expert_mask"]
        weights = []

        def step(ids, attn, last):
            rows, last = torch.arange(ids.shape[0], device=model.device), last.to(model.device)
            hs = [model.hidden(ids, attn, t)[rows, last]]
            if not bool(mask.any()):
                return model.lm_head(hs[0])
            hs += [model.hidden(ids, attn, {**t, "prompts": t["experts"][e]})[rows, last] if mask[e] > 0
                   else torch.zeros_like(hs[0]) for e in range(mask.shape[0])]
            stack = torch.stack(hs, 1)
            if not weights:  # the first step reads the contexts' last tokens: the gate of the module docstring
                weights.append(gate(model.frozen_states(ids, attn, last), stack, mask, t, float(c.scaling)))
            mixed = torch.einsum("ne,ned->nd", weights[0], stack)
            lam, w = cls.weights(c)
            return lam * model.lm_head(hs[0]) + w * model.lm_head(mixed)

        return model.generate(examples, t, max_new_tokens=ctx.cfg.model.llm.max_new_tokens, step_logits=step)
