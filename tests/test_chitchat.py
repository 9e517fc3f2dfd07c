"""The chitchat dialogue dataset (modality llm): examples checked against the raw dataset.json, one
speaker per client, the split by conversation, the speaker filter, and data.max_train_per_client (on
every modality)."""

import csv
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from fedpers.config import ConfigError, DataConfig, ExperimentConfig, PartitionerConfig, RunConfig
from fedpers.data import DataError, build_federated
from fedpers.data.config import DialogueConfig
from fedpers.data.dialogue import chitchat_json, load_dialogues
from fedpers.data.partition import _build_dialogue_federation as build_dialogue_federation
from fedpers.data.partition import _build_cached
from fedpers.data.schemes import validate_data

NUM_CLIENTS = 8


def chitchat(**kw) -> DataConfig:
    return DataConfig(dataset="chitchat", partitioner=PartitionerConfig(name="natural_id", id_column="user"), **kw)


@pytest.fixture(scope="module")
def reference():
    """An independent reading of dataset.json: per conversation index, its turns as (sender, text),
    consecutive messages by one sender merged, empty messages dropped; and per speaker its messages."""
    with open(chitchat_json()) as f:
        raw = json.load(f)
    convs, messages = [], {}
    for conv in raw.values():
        turns = []
        for run in conv["messages"]:
            for m in run:
                messages[m["sender"]] = messages.get(m["sender"], 0) + 1
                text = m["text"].strip()
                if not text:
                    continue
                if turns and turns[-1][0] == m["sender"]:
                    turns[-1] = (m["sender"], turns[-1][1] + "\n" + text)
                else:
                    turns.append((m["sender"], text))
        convs.append(turns)
    return {"raw": raw, "convs": convs, "messages": messages}


def locate(ref, conv_index: int, example: dict) -> tuple[int, str]:
    """(position, sender) of the turn in conversation ``conv_index`` whose text is the example's target
    and whose preceding turns are its context; fails when there is none."""
    turns = ref["convs"][conv_index]
    for pos in range(1, len(turns)):
        sender, text = turns[pos]
        if text != example["target"]:
            continue
        k = len(example["context"])
        before = turns[max(0, pos - k):pos]
        want = [{"role": "assistant" if s == sender else "user", "content": t} for s, t in before]
        if example["context"] == want:
            return pos, sender
    raise AssertionError(f"no turn of conversation {conv_index} matches {example}")


@pytest.fixture(scope="module")
def fed():
    return build_federated(chitchat(), NUM_CLIENTS, 0)


def test_parse_counts_match_the_package_and_are_cached():
    d = load_dialogues()
    assert load_dialogues() is d  # per-process cache
    assert len(d.conversations) == 7168 and len(d.speakers) == 1315 and int(d.utterances.sum()) == 258145
    assert int((d.utterances >= 100).sum()) == 263
    assert all(t and t == t.strip() for t in d.turn_text)  # no empty target or context turn


def test_examples_are_preceding_turns_and_the_speakers_next_turn(fed, reference):
    d = load_dialogues()
    for pid, c in enumerate(fed.clients):
        speaker = fed.client_info[pid]["speaker"]
        for x, y in [*zip(c.x_train, c.y_train.tolist()), *zip(c.x_test, c.y_test.tolist())]:
            assert set(x) == {"context", "target"} and len(x["context"]) == 1  # default context_turns=1
            pos, sender = locate(reference, y, x)
            assert sender == speaker  # the target is the client's own turn
            assert x["context"][0]["role"] == "user"  # the partner's turn before it
    # By hand, the first conversation of dataset.json: a two-message opener, then a three-message reply.
    first = next(iter(reference["raw"].values()))["messages"]
    assert [m["text"] for m in first[0]] == ["Hello", "How are you doing today?"]
    t = 3  # the 4th turn: context_turns=2 gives the speaker's own previous turn, then the partner's
    assert d.turn_conv[t] == 0 and d.turn_start[t] == 0
    assert d.example(t, 2) == {
        "context": [{"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"},
                    {"role": "user", "content": first[2][0]["text"]}],
        "target": "oh wow haha\nso you still feel tired huh?"}
    assert d.example(1, 5)["context"] == [{"role": "user", "content": "Hello\nHow are you doing today?"}]


def test_longer_context_is_the_preceding_turns_in_order(reference):
    fed3 = build_federated(chitchat(dialogue=DialogueConfig(context_turns=3)), 3, 0)
    lengths = set()
    for pid, c in enumerate(fed3.clients):
        for x, y in zip(c.x_train, c.y_train.tolist()):
            pos, sender = locate(reference, y, x)
            assert len(x["context"]) == min(3, pos)  # up to 3, fewer only at the start of a conversation
            assert sender == fed3.client_info[pid]["speaker"]
            lengths.add(len(x["context"]))
    assert lengths == {1, 2, 3}


def test_one_speaker_per_client_with_all_their_examples(fed, reference):
    speakers = [i["speaker"] for i in fed.client_info]
    assert len(set(speakers)) == NUM_CLIENTS
    for pid, c in enumerate(fed.clients):
        n_ref = sum(1 for turns in reference["convs"] for s, _ in turns[1:] if s == speakers[pid])
        assert c.num_train + len(c.y_test) == n_ref  # no cap by default: every example of the speaker
        assert reference["messages"][speakers[pid]] >= 100  # data.dialogue.min_utterances default
    # held-out (unseen) clients are drawn among these partitions by run.holdout_clients
    from fedpers.experiment import split_clients

    train, held = split_clients(RunConfig(num_clients=NUM_CLIENTS, holdout_clients=2))
    assert len(held) == 2 and sorted(train + held) == list(range(NUM_CLIENTS))
    assert all(fed.clients[h].num_train > 0 and len(fed.clients[h].y_test) > 0 for h in held)


def test_train_and_test_never_share_a_conversation(fed, reference):
    total_train = total_test = 0
    for pid, c in enumerate(fed.clients):
        tr, te = set(c.y_train.tolist()), set(c.y_test.tolist())
        assert tr and te and not tr & te, f"client {pid} has conversations {tr & te} on both sides"
        total_train, total_test = total_train + c.num_train, total_test + len(c.y_test)
        info = fed.client_info[pid]
        assert (info["conversations_train"], info["conversations_test"]) == (len(tr), len(te))
    assert 0.1 < total_test / (total_train + total_test) < 0.35  # data.test_fraction=0.2, by whole conversations
    # Another seed: another split of the same speakers (the speaker draw is data.dialogue.speaker_seed's).
    other = build_federated(chitchat(), NUM_CLIENTS, 1)
    assert [i["speaker"] for i in other.client_info] == [i["speaker"] for i in fed.client_info]
    assert any(not torch.equal(a.y_test, b.y_test) for a, b in zip(fed.clients, other.clients))
    for c in other.clients:
        assert not set(c.y_train.tolist()) & set(c.y_test.tolist())


def test_builds_are_deterministic_and_speaker_draws_nested():
    cfg = chitchat(max_train_per_client=16)
    a, b = build_dialogue_federation(cfg, 5, 3), build_dialogue_federation(cfg, 5, 3)  # uncached, twice
    assert a.client_info == b.client_info
    for ca, cb in zip(a.clients, b.clients):
        assert ca.x_train == cb.x_train and ca.x_test == cb.x_test
        assert torch.equal(ca.y_train, cb.y_train) and torch.equal(ca.y_test, cb.y_test)
    more = build_federated(cfg, 9, 3)
    assert {i["speaker"] for i in a.client_info} <= {i["speaker"] for i in more.client_info}
    other = build_federated(chitchat(max_train_per_client=16, dialogue=DialogueConfig(speaker_seed=1)), 5, 3)
    assert {i["speaker"] for i in other.client_info} != {i["speaker"] for i in a.client_info}


def test_max_train_per_client_caps_chitchat_training_only(fed):
    capped = build_federated(chitchat(max_train_per_client=5), NUM_CLIENTS, 0)
    for full, c, info in zip(fed.clients, capped.clients, capped.client_info):
        assert c.num_train == len(c.x_train) == min(5, full.num_train) == 5
        assert info["examples_before_cap"] == full.num_train
        assert c.x_test == full.x_test and torch.equal(c.y_test, full.y_test)  # test split untouched
        keys = {json.dumps(x, sort_keys=True) for x in full.x_train}
        assert all(json.dumps(x, sort_keys=True) in keys for x in c.x_train)  # a subsample of the training set


@pytest.mark.parametrize("dataset,partitioner", [("digits", PartitionerConfig(alpha=1.0)),
                                                 ("synthetic_text_small", PartitionerConfig(name="natural_id", id_column="user"))])
def test_max_train_per_client_on_other_datasets(dataset, partitioner):
    full = build_federated(DataConfig(dataset=dataset, partitioner=partitioner), 4, 0)
    capped = build_federated(DataConfig(dataset=dataset, partitioner=partitioner, max_train_per_client=10), 4, 0)
    for f, c in zip(full.clients, capped.clients):
        assert f.num_train > 10 and c.num_train == len(c.x_train) == 10
        if isinstance(f.x_test, torch.Tensor):
            assert torch.equal(c.x_test, f.x_test) and torch.equal(c.y_test, f.y_test)
            rows = {tuple(r) for r in f.x_train.flatten(1).tolist()}
            assert all(tuple(r) in rows for r in c.x_train.flatten(1).tolist())
        else:
            assert c.x_test == f.x_test and torch.equal(c.y_test, f.y_test)
            assert set(c.x_train) <= set(f.x_train)
    # a fresh (uncached) build draws the same subsample
    key = json.dumps(asdict(DataConfig(dataset=dataset, partitioner=partitioner, max_train_per_client=10)), sort_keys=True)
    fresh = _build_cached.__wrapped__(key, 4, 0)
    for a, b in zip(capped.clients, fresh.clients):
        assert torch.equal(a.y_train, b.y_train)


def _validate(data: DataConfig, num_clients: int) -> None:
    validate_data(ExperimentConfig(run=RunConfig(num_clients=num_clients, clients_per_round=1), data=data))


def eligible_in_raw(reference, min_messages: int) -> int:
    convs_with_examples: dict[str, set] = {}
    for ci, turns in enumerate(reference["convs"]):
        for s, _ in turns[1:]:
            convs_with_examples.setdefault(s, set()).add(ci)
    return sum(1 for s, n in reference["messages"].items()
               if n >= min_messages and len(convs_with_examples.get(s, ())) >= 2)


@pytest.mark.parametrize("min_utterances,num_clients", [(100, 300), (1000, 60)])
def test_too_few_eligible_speakers_is_refused_with_the_count(reference, min_utterances, num_clients):
    data = chitchat(dialogue=DialogueConfig(min_utterances=min_utterances))
    with pytest.raises(ConfigError) as e:
        _validate(data, num_clients)
    assert e.value.field == "data.dialogue.min_utterances"
    n = int(re.search(r"(\d+) of chitchat's 1315 speakers are eligible", str(e.value)).group(1))
    assert n == eligible_in_raw(reference, min_utterances) < num_clients
    assert f"run.num_clients={num_clients}" in str(e.value)
    _validate(data, n)  # exactly as many as eligible is fine
    with pytest.raises(DataError, match=f"{n} of chitchat's"):
        build_federated(data, n + 1, 0)


@pytest.mark.parametrize("override,field", [
    ({"partitioner": PartitionerConfig(name="dirichlet")}, "data.partitioner.name"),
    ({"partitioner": PartitionerConfig(name="iid")}, "data.partitioner.name"),
    ({"partitioner": PartitionerConfig(name="natural_id", id_column="conversation")}, "data.partitioner.id_column"),
    ({"max_train_per_client": -1}, "data.max_train_per_client"),
    ({"dialogue": DialogueConfig(context_turns=0)}, "data.dialogue.context_turns"),
    ({"dialogue": DialogueConfig(min_utterances=0)}, "data.dialogue.min_utterances"),
])
def test_bad_settings_are_refused_naming_the_field(override, field):
    data = chitchat()
    for k, v in override.items():
        setattr(data, k, v)
    with pytest.raises(ConfigError) as e:
        _validate(data, 4)
    assert e.value.field == field
    if field == "data.partitioner.name":
        assert "allowed: natural_id" in str(e.value)


def test_cli_refuses_another_partitioner_with_exit_2(capsys, tmp_path):
    from fedpers.partitions import main

    assert main(["--out", str(tmp_path / "p"), "data.dataset=chitchat"]) == 2
    assert "data.partitioner.name" in capsys.readouterr().err


def test_partition_report_counts_examples_and_conversations(fed, tmp_path):
    from fedpers.data.stats import write_report

    rep = write_report(fed, tmp_path, "natural_id, seed 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clients.csv", "examples_per_client.png",
                                                          "heterogeneity.json", "partitions.json"]
    rows = list(csv.DictReader((tmp_path / "clients.csv").open()))
    assert len(rows) == NUM_CLIENTS
    for row, c, info in zip(rows, fed.clients, fed.client_info):
        assert row["speaker"] == info["speaker"]
        assert (int(row["num_train"]), int(row["num_test"])) == (c.num_train, len(c.y_test))
        assert int(row["conversations_test"]) == len(set(c.y_test.tolist()))
    assert rep["heterogeneity"]["size_min"] == min(c.num_train + len(c.y_test) for c in fed.clients)
    assert fed.label_counts()[:, 0].tolist() == [c.num_train + len(c.y_test) for c in fed.clients]


@pytest.mark.parametrize("dataset,partitioner", [("chitchat", None), ("digits", PartitionerConfig(alpha=1.0))])
def test_max_test_per_client_caps_the_test_split_only_and_seeded(fed, dataset, partitioner):
    if dataset == "chitchat":
        full, make = fed, lambda **kw: build_federated(chitchat(**kw), NUM_CLIENTS, 0)
    else:
        def make(**kw):
            return build_federated(DataConfig(dataset=dataset, partitioner=partitioner, **kw), 4, 0)
        full = make()
    capped, again = make(max_test_per_client=3), make(max_test_per_client=3)
    for f, c, a in zip(full.clients, capped.clients, again.clients):
        assert len(c.y_test) == min(3, len(f.y_test)) and len(f.y_test) > 3
        assert torch.equal(c.y_train, f.y_train)  # training split untouched
        xs = [json.dumps(x, sort_keys=True) if isinstance(x, dict) else x.numpy().tobytes() for x in f.x_test]
        got = [json.dumps(x, sort_keys=True) if isinstance(x, dict) else x.numpy().tobytes() for x in c.x_test]
        assert all(g in xs for g in got)  # a subsample of the client's own test split
        assert torch.equal(c.y_test, a.y_test)  # the same for every run with this seed


def test_a_speaker_with_one_training_conversation_keeps_it_whole_without_validation(fed, monkeypatch, caplog):
    """data.val_fraction carves whole conversations; a speaker whose non-test side is one conversation
    cannot give one away: it trains on all of it, has no validation split, and the run says so."""
    from fedpers.data import dialogue

    real, calls = dialogue.split_by_conversation, []

    def split(d, rows, fraction, rng):
        calls.append(len(rows))
        if len(calls) == 2:  # client 0's validation cut (its test cut is the first call)
            raise ValueError("a speaker needs examples in at least 2 conversations")
        return real(d, rows, fraction, rng)

    plain = build_dialogue_federation(chitchat(val_fraction=0.25), NUM_CLIENTS, 0)
    assert plain.clients[0].x_val  # this speaker has conversations to spare
    monkeypatch.setattr(dialogue, "split_by_conversation", split)
    with caplog.at_level("WARNING", logger="fedpers"):
        out = build_dialogue_federation(chitchat(val_fraction=0.25), NUM_CLIENTS, 0)
    first, rest = out.clients[0], out.clients[1:]
    assert first.x_val is None and first.x_train == fed.clients[0].x_train  # every non-test reply trains
    assert first.x_test == fed.clients[0].x_test
    assert [(c.x_train, c.x_val) for c in rest] == [(c.x_train, c.x_val) for c in plain.clients[1:]]
    last = caplog.records[-1]
    assert 0 in last.args[-1] and "no validation split" in last.getMessage()


@pytest.mark.parametrize("dataset,partitioner", [("chitchat", None), ("digits", PartitionerConfig(alpha=1.0))])
def test_max_val_per_client_caps_the_validation_split_only_and_seeded(fed, dataset, partitioner):
    """Validation is scored every round: the cap keeps a seeded subsample of each client's own validation
    rows and leaves its training and test splits as they were."""
    if dataset == "chitchat":
        def make(**kw):
            return build_federated(chitchat(val_fraction=0.25, **kw), NUM_CLIENTS, 0)
    else:
        def make(**kw):
            return build_federated(DataConfig(dataset=dataset, partitioner=partitioner, val_fraction=0.25, **kw), 4, 0)
    full, capped, again = make(), make(max_val_per_client=2), make(max_val_per_client=2)
    assert any(f.has_validation and len(f.y_val) > 2 for f in full.clients)
    for f, c, a in zip(full.clients, capped.clients, again.clients):
        assert torch.equal(c.y_train, f.y_train) and torch.equal(c.y_test, f.y_test)
        if not f.has_validation:
            assert not c.has_validation
            continue
        assert len(c.y_val) == min(2, len(f.y_val))
        xs = [json.dumps(x, sort_keys=True) if isinstance(x, dict) else x.numpy().tobytes() for x in f.x_val]
        got = [json.dumps(x, sort_keys=True) if isinstance(x, dict) else x.numpy().tobytes() for x in c.x_val]
        assert all(g in xs for g in got) and len(set(got)) == len(got)
        assert got == [json.dumps(x, sort_keys=True) if isinstance(x, dict) else x.numpy().tobytes() for x in a.x_val]
