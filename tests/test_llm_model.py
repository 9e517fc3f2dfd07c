"""The llm modality: a frozen causal LM with peft adapters, its objective, caches, budgets and generation
(the backbone's loading and refusals: tests/test_llm_backbone.py).

Everything runs on a tiny random Llama (2 layers, hidden 32, grouped-query attention) and a word-level
tokenizer with a ChatML template (tests/llm_helpers.py); only the test marked slow touches the real SmolLM2.
"""

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from fedpers.models.llm import PeftCausalLM
from fedpers.models.llm_backbone import BackboneError
from fedpers.models.llm_chat import ChatFormat
from tests.llm_helpers import ADAPTERS, EXAMPLES, SYSTEM, random_tensors, tiny_llama, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models():
    return {a: tiny_model(a) for a in ADAPTERS}


def full_logits(m: PeftCausalLM, ids, mask, tensors) -> torch.Tensor:
    """The model's own logits at every real position (peft's forward, no target-only projection)."""
    from torch.func import functional_call

    out = functional_call(m.peft, m._params(tensors), (), {"input_ids": ids, "attention_mask": mask}, strict=False)
    return out.logits[:, m.num_virtual if m.adapter == "prompt" else 0:]


# ---- the objective ------------------------------------------------------------------------------------
def test_labels_outside_the_target_never_reach_the_loss_and_target_tokens_do(models):
    m = models["lora"]
    batch = m.prepare(EXAMPLES)
    tensors = random_tensors(m)
    loss = m.lm_loss(batch, tensors)
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(4, len(m.tokenizer), batch.labels.shape, generator=g)
    context = batch.labels.clone()
    context[~batch.target] = noise[~batch.target]  # real token ids at every context position
    moved = m.lm_loss(type(batch)(**{**vars(batch), "labels": context}), tensors)
    assert torch.equal(moved, loss)
    row, col = 1, int(batch.prompt_lengths[1]) + 1
    target = batch.labels.clone()
    target[row, col] = (target[row, col] + 1) % len(m.tokenizer)
    assert not torch.allclose(m.lm_loss(type(batch)(**{**vars(batch), "labels": target}), tensors), loss)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_target_only_projection_equals_the_full_logits_loss(models, adapter):
    m = models[adapter]
    batch = m.prepare(EXAMPLES)
    tensors = random_tensors(m)
    logits = full_logits(m, batch.ids, batch.mask, tensors)
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    torch.testing.assert_close(m.lm_loss(batch, tensors), flat, atol=1e-5, rtol=0)
    # and the model's own loss (peft pads its labels for the virtual tokens)
    from torch.func import functional_call

    own = functional_call(m.peft, m._params(tensors), (), {"input_ids": batch.ids, "attention_mask": batch.mask,
                                                           "labels": batch.labels}, strict=False).loss
    torch.testing.assert_close(m.lm_loss(batch, tensors), own, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_perplexity_and_accuracy_match_a_hand_computation(models, adapter):
    m = models[adapter]
    tensors = random_tensors(m, seed=2)
    total_nll, total_n, total_correct = 0.0, 0, 0
    hand_nll, hand_n, hand_correct = 0.0, 0, 0
    for part in m.prepare(EXAMPLES).by_length(2):  # stats add up over batches
        nll, n, correct = m.token_stats(part, tensors)
        total_nll, total_n, total_correct = total_nll + nll, total_n + n, total_correct + correct
        with torch.no_grad():
            logp = torch.log_softmax(full_logits(m, part.ids, part.mask, tensors).double(), dim=-1)
        for i in range(len(part)):
            for t in range(1, int(part.lengths[i])):
                if part.target[i, t]:
                    y = int(part.ids[i, t])
                    hand_nll -= float(logp[i, t - 1, y])
                    hand_n += 1
                    hand_correct += int(int(logp[i, t - 1].argmax()) == y)
    assert total_n == hand_n == m.prepare(EXAMPLES).num_target_tokens
    assert abs(torch.exp(torch.tensor(total_nll / total_n)) - torch.exp(torch.tensor(hand_nll / hand_n))) < 1e-4
    assert total_correct == hand_correct


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sgd_moves_only_the_client_tensors(models, adapter):
    m = models[adapter]
    frozen = {n: p.detach().clone() for n, p in m.peft.named_parameters()}
    batch = m.prepare(EXAMPLES)
    tensors = {k: v.clone().requires_grad_(True) for k, v in random_tensors(m, seed=3).items()}
    start = {k: v.detach().clone() for k, v in tensors.items()}
    opt = torch.optim.SGD(list(tensors.values()), lr=0.5)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = m.lm_loss(batch, tensors)
        loss.backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors.values())
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(tensors[k].detach(), start[k]) for k in tensors)
    for n, p in m.peft.named_parameters():
        assert torch.equal(p, frozen[n]), n  # bit-identical, adapter slots included


def test_lora_fold_residual_is_added_to_the_frozen_weight_for_one_call_only(models):
    m = models["lora"]
    batch = m.prepare(EXAMPLES)
    tensors = random_tensors(m)
    module = "model.layers.0.self_attn.q_proj"
    weight = m.peft.get_parameter(f"base_model.model.{module}.base_layer.weight")
    before = weight.detach().clone()
    fold = {**tensors, f"{module}.fold.weight": 0.1 * torch.ones_like(weight)}
    assert not torch.allclose(m.lm_loss(batch, fold), m.lm_loss(batch, tensors))
    assert torch.equal(weight, before)


def test_adapter_from_layer_caches_the_frozen_layers_below_exactly():
    m = tiny_model("lora", layers=3, adapter_from_layer=2)
    assert {k.split(".")[2] for k in m.tensor_shapes()} == {"2"}  # LoRA on the top layer only
    batch = m.prepare(EXAMPLES)
    module = "model.layers.2.self_attn.q_proj"  # and a folded residual there (FedEx-LoRA), as the run sees it
    weight = m.peft.get_parameter(f"base_model.model.{module}.base_layer.weight")
    tensors = {**random_tensors(m, seed=6), f"{module}.fold.weight": 0.2 * torch.randn_like(weight)}
    for rows in ([0, 2], [1], [2, 1, 0]):
        part = batch.select(rows)
        cached = m.batch_hidden(part, tensors)
        plain = m._peft_hidden(part.ids, part.mask, tensors)  # peft's own forward through every layer
        real = part.mask.bool()  # padding is never read (right padding, causal attention)
        torch.testing.assert_close(cached[real], plain[real], atol=1e-5, rtol=0)
    assert (m.split.misses, m.split.hits) == (1, 2)  # layers 0-1 ran once for the prepared list
    # and gradients are those of the uncached forward
    grads = []
    for fn in (lambda t: m.lm_loss(batch.select([0, 1]), t),
               lambda t: m.lm_loss(dataclasses.replace(batch.select([0, 1]), source=None), t)):
        t = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        fn(t).backward()
        grads.append({k: v.grad for k, v in t.items()})
    for k in tensors:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)
    with pytest.raises(BackboneError, match="adapter=lora or prompt"):
        tiny_model("prefix", adapter_from_layer=1)
    with pytest.raises(BackboneError, match="must be in 1..1"):
        tiny_model("lora", adapter_from_layer=2)


def test_late_prompts_enter_at_layer_l_as_transformers_runs_the_upper_layers():
    """Reference: transformers' own forward of a model cut to layers L.., fed [prompts; hidden states
    entering layer L] as inputs_embeds (its own causal mask, rotary positions 0..K+T-1 and final norm)."""
    import copy

    m = tiny_model("prompt", layers=3, adapter_from_layer=2)
    assert m.late_prompts and set(m.tensor_shapes()) == {"prompts"}
    batch = m.prepare(EXAMPLES)
    tensors = random_tensors(m, seed=8, scale=1.0)
    ours = m.batch_hidden(batch, tensors)
    with torch.no_grad():
        below = m.base(input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True).hidden_states[2]
        top = copy.deepcopy(m.base.get_decoder())
        top.layers = top.layers[2:]
        top.config.num_hidden_layers = 1
        p = tensors["prompts"].unsqueeze(0).expand(len(batch), -1, -1)
        ref = top(inputs_embeds=torch.cat([p, below], 1),
                  attention_mask=torch.cat([torch.ones(len(batch), 3, dtype=torch.long), batch.mask], 1),
                  use_cache=False).last_hidden_state[:, 3:]
    real = batch.mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-4)
    # the prompts act (other prompts, other states) but only from layer L: the states entering it are theirs
    other = m.batch_hidden(batch, random_tensors(m, seed=9, scale=1.0))
    assert not torch.allclose(other[real], ours[real], atol=1e-3)
    # their gradient is that of the uncached computation, and a step of SGD lowers the loss
    t = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    loss = m.lm_loss(batch, t)
    loss.backward()
    assert float(t["prompts"].grad.abs().sum()) > 0
    with torch.no_grad():
        assert float(m.lm_loss(batch, {"prompts": t["prompts"] - 0.5 * t["prompts"].grad})) < float(loss)
    # generation goes through the same late prompts: its first token is the argmax after the prompt
    ids = torch.tensor([m.chat.prompt_ids(EXAMPLES[1]["context"])])
    first = int(m.lm_head(m.hidden(ids, torch.ones_like(ids), tensors))[0, -1].argmax())
    reply = m.generate([EXAMPLES[1]], tensors, max_new_tokens=1)[0]
    assert reply == ("" if first in m.stop_ids else m.tokenizer.decode([first]).strip())
    # the frozen model's states (pFedMoAP's gate query) read no prompt, cached or not
    plain = m.frozen_states(batch.ids, batch.mask, batch.prompt_lengths - 1)
    torch.testing.assert_close(m.frozen_batch_states(batch), plain, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        own = m.base.get_decoder()(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
    torch.testing.assert_close(plain, own[torch.arange(len(batch)), batch.prompt_lengths - 1], atol=1e-5, rtol=1e-4)


def test_the_frozen_rows_are_shared_across_lists_and_models_of_one_backbone():
    from fedpers.models import llm_split

    tok = tiny_tokenizer()
    share = f"test-{time.time()}"
    lora = PeftCausalLM(tiny_llama(len(tok), layers=3), tok, "lora", num_prompts=3, r=4, alpha=8.0,
                        context_tokens=40, target_tokens=8, system_prompt=SYSTEM, adapter_from_layer=2, share=share)
    prompt = PeftCausalLM(tiny_llama(len(tok), layers=3), tok, "prompt", num_prompts=3, r=4, alpha=8.0,
                          context_tokens=40, target_tokens=8, system_prompt=SYSTEM, adapter_from_layer=2, share=share)
    assert lora.split.store is prompt.split.store is llm_split._SHARED[(share, 2)]
    lora.batch_hidden(lora.prepare(EXAMPLES), random_tensors(lora))
    assert (lora.split.misses, len(lora.split.store.rows)) == (1, 3)
    # another list holding two of the same examples, in another order, on the other model: no new rows
    again = prompt.prepare([EXAMPLES[2], EXAMPLES[0]])
    tensors = random_tensors(prompt, seed=3)
    cached = prompt.batch_hidden(again.select([1, 0]), tensors)
    assert (prompt.split.misses, prompt.split.hits, len(prompt.split.store.rows)) == (0, 1, 3)
    sub = again.select([1, 0])
    real = sub.mask.bool()
    torch.testing.assert_close(cached[real], prompt.hidden(sub.ids, sub.mask, tensors)[real], atol=1e-5, rtol=1e-4)
    # a budget too small for one row: every batch is computed, nothing kept, results unchanged
    prompt.place("cpu", cache_mb=0.0)
    assert len(prompt.split.store.rows) == 0
    torch.testing.assert_close(prompt.batch_hidden(again.select([1, 0]), tensors), cached, atol=1e-5, rtol=1e-4)
    assert len(prompt.split.store.rows) == 0


# ---- inputs and budgets -------------------------------------------------------------------------------
def test_prepare_caches_per_list_and_batches_trim_to_their_longest_row(models):
    m = models["lora"]
    batch = m.prepare(EXAMPLES)
    assert m.prepare(EXAMPLES) is batch
    assert m.prepare(list(EXAMPLES)) is not batch
    assert torch.equal(batch.mask.sum(1), batch.lengths)
    assert torch.equal(batch.labels[batch.target], batch.ids[batch.target])
    assert bool((batch.labels[~batch.target] == -100).all())
    short = batch.select([1])
    assert short.ids.shape == (1, int(batch.lengths[1]))
    parts = batch.by_length(2)
    assert sorted(int(x) for p in parts for x in p.lengths) == sorted(int(x) for x in batch.lengths)
    assert all(p.ids.shape[1] == int(p.lengths.max()) for p in parts)


def test_target_budget_keeps_the_end_of_turn_only_when_the_reply_fits():
    tok = tiny_tokenizer()
    chat = ChatFormat(tok, context_tokens=40, target_tokens=4, system_prompt=SYSTEM)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat.end_id == end
    assert chat.target_ids("it is sunny") == tok("it is sunny", add_special_tokens=False)["input_ids"] + [end]
    cut = chat.target_ids("paris is the capital of france")
    assert len(cut) == 4 and end not in cut


def test_context_keeps_the_most_recent_tokens_within_the_budget():
    tok = tiny_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    context = EXAMPLES[0]["context"]
    whole = ChatFormat(tok, 1000, 8, SYSTEM)
    full = len(whole.encode(whole.render(context)))
    for budget in range(12, full + 3):
        chat = ChatFormat(tok, budget, 8, SYSTEM)
        ids = chat.prompt_ids(context)
        assert len(ids) <= budget
        # the prompt always ends with the last turn's most recent words and the generation prompt
        tail = enc("france <|im_end|> <|im_start|> assistant")
        assert ids[-len(tail):] == tail
        kept = [t for start in range(len(context)) if ids == chat.encode(chat.render(context[start:]))
                for t in [start]]
        if kept:  # whole turns: the oldest kept turn is the oldest that fits
            start = kept[0]
            assert start == 0 or len(chat.encode(chat.render(context[start - 1:]))) > budget
        else:  # not even the last turn fits whole: its content is cut from the left, to the budget
            assert len(ids) == budget
            assert enc("capital of france")[-1] in ids
    assert ChatFormat(tok, full, 8, SYSTEM).prompt_ids(context) == whole.encode(whole.render(context))


def test_a_budget_below_the_templates_fixed_tokens_is_refused():
    tok = tiny_tokenizer()
    fixed = ChatFormat(tok, 100, 8, SYSTEM).fixed_tokens
    ChatFormat(tok, fixed + 1, 8, SYSTEM)
    with pytest.raises(BackboneError, match=r"llm.context_tokens=.*fixed tokens"):
        ChatFormat(tok, fixed, 8, SYSTEM)
    with pytest.raises(BackboneError, match="llm.target_tokens"):
        ChatFormat(tok, 100, 0, SYSTEM)


# ---- generation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["prompt", "lora"])
def test_batched_greedy_generation_matches_one_row_at_a_time(models, adapter):
    m = models[adapter]
    tensors = random_tensors(m, seed=4)
    together = m.generate(EXAMPLES, tensors, max_new_tokens=5)
    alone = [m.generate([ex], tensors, max_new_tokens=5)[0] for ex in EXAMPLES]
    assert together == alone
    assert all(isinstance(s, str) for s in together)
    # the first generated word is the argmax of the model's own logits after the prompt
    ids = torch.tensor([m.chat.prompt_ids(EXAMPLES[1]["context"])])
    with torch.no_grad():
        first = int(full_logits(m, ids, torch.ones_like(ids), tensors)[0, -1].argmax())
    if first not in m.stop_ids:
        assert together[1].split()[0] == m.tokenizer.decode([first]).strip()
