"""Dialogue datasets for LLM personalization (dataset modality ``llm``): one client per speaker.

``chitchat`` is the Chit Chat Challenge corpus of the BYU PCC lab, shipped as ``dataset.json`` in the
PyPI package ``chitchat-dataset==0.9.0`` (MIT): 7,168 human-human conversations, 258,145 messages by
1,315 speakers (an id per message), with conversation prompts and ratings. Offline. Its format:
``{conversation_id: {"messages": [[{"text", "timestamp", "sender"}, ...], ...], "prompt", "ratings", "start"}}``
where each inner list is a run of messages by one sender (the runs alternate between the two speakers;
3,150 conversations hold one run only: an opener nobody answered).

What a client holds. The messages of a conversation become **turns**: consecutive messages by one
sender, joined with newlines (33 empty messages are dropped first). Every turn that has a preceding turn
is an **example** of its sender::

    {"context": [{"role": "user" | "assistant", "content": str}, ...],  # up to context_turns turns, oldest first
     "target": str}                                                     # the speaker's own next turn

Turns by the other speaker are role ``user``, earlier turns by the same speaker role ``assistant``; a
conversation's first turn is never a target (empty context), and no target is empty.
``ClientData.x_train / x_test`` hold these dicts; ``y_train / y_test`` hold each example's
**conversation index** (int64: the conversation's position in ``dataset.json``, see
:attr:`Dialogues.conversations`), so consumers can group by conversation and tests can prove the split.

How a federation is built (:func:`build_dialogue_federation`):

- eligible speakers: at least ``data.dialogue.min_utterances`` messages, examples in at least two
  conversations (train and test must come from different conversations) and at least
  ``data.min_client_size`` examples;
- ``run.num_clients`` of them are drawn by ``data.dialogue.speaker_seed`` (not ``run.seed``: every seed
  and strategy sees the same speakers; the draw is a prefix of one permutation, so 10 speakers are the
  first 10 of a 50-speaker run); ``run.holdout_clients`` holds some of them out as unseen clients;
- flwr-datasets' ``NaturalIdPartitioner`` on the ``user`` column (the speaker id) makes one client per
  speaker (partition ids follow the sorted speaker ids, as NaturalIdPartitioner numbers them);
- each client's conversations are visited in an order seeded by ``run.seed`` and the speaker, and a whole
  conversation goes to the test split when it brings it closer to ``data.test_fraction`` of the
  speaker's examples (at least one conversation on each side): a conversation is never on both sides;
- ``data.max_train_per_client`` (0 = all) subsamples the training examples, seeded; the test split is
  untouched.

Parsing the JSON is cached per process (:func:`load_dialogues`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpers.data.registry import register_dataset

CHITCHAT_PACKAGE = "chitchat-dataset==0.9.0"
TURN_SEPARATOR = "\n"  # between the messages of one turn
# Seed stream of the per-speaker conversation split (mixed with run.seed and the speaker index).
_SPLIT_STREAM = 0xD1A


@dataclass(frozen=True)
class Dialogues:
    """A dialogue corpus as flat turn arrays (T turns, S speakers, C conversations)."""

    conversations: tuple[str, ...]  # (C,) conversation ids in file order: an example's y is an index here
    speakers: tuple[str, ...]  # (S,) speaker ids, sorted: a speaker index is a position here
    utterances: np.ndarray  # (S,) messages per speaker, empty ones included (the dataset's own count)
    turn_conv: np.ndarray  # (T,) conversation index of each turn
    turn_speaker: np.ndarray  # (T,) speaker index of each turn
    turn_start: np.ndarray  # (T,) index of the first turn of the turn's conversation
    turn_text: tuple[str, ...]  # (T,) the turn's messages joined by TURN_SEPARATOR

    @property
    def is_example(self) -> np.ndarray:
        """(T,) bool: the turn has a preceding turn, so it is a target of its speaker."""
        return np.arange(len(self.turn_text)) > self.turn_start

    def speaker_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(examples, conversations with examples) per speaker, both (S,)."""
        ex = self.is_example
        spk, conv = self.turn_speaker[ex], self.turn_conv[ex]
        examples = np.bincount(spk, minlength=len(self.speakers))
        pairs = np.unique(spk.astype(np.int64) * len(self.conversations) + conv)
        convs = np.bincount(pairs // len(self.conversations), minlength=len(self.speakers))
        return examples, convs

    def example(self, i: int, context_turns: int) -> dict:
        """Turn ``i`` as an example of its speaker: up to ``context_turns`` preceding turns, oldest first."""
        s = self.turn_speaker[i]
        lo = max(int(self.turn_start[i]), i - context_turns)
        context = [{"role": "assistant" if self.turn_speaker[j] == s else "user", "content": self.turn_text[j]}
                   for j in range(lo, i)]
        return {"context": context, "target": self.turn_text[i]}


def chitchat_json(path: str | None = None) -> Path:
    """The chitchat ``dataset.json``: in the folder ``path`` (``data.path``), else the installed package's."""
    if path is not None:
        return Path(path) / "dataset.json"
    try:
        import chitchat_dataset
    except ImportError:
        raise FileNotFoundError(f"dataset chitchat needs the package {CHITCHAT_PACKAGE} "
                                f"(pip install {CHITCHAT_PACKAGE}), or data.path = a folder with its dataset.json") from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


@functools.lru_cache(maxsize=2)
def load_dialogues(path: str | None = None) -> Dialogues:
    """Parse chitchat's ``dataset.json`` into turns. Cached per process (and per ``path``)."""
    file = chitchat_json(path)
    with open(file, "rb") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected an object of conversations, got {type(raw).__name__}")
    conv_ids = tuple(raw)
    sender_ix: dict[str, int] = {}
    utterances: list[int] = []
    t_conv: list[int] = []
    t_sender: list[int] = []
    t_start: list[int] = []
    texts: list[str] = []
    for ci, cid in enumerate(conv_ids):
        try:
            runs = raw[cid]["messages"]
        except (KeyError, TypeError):
            raise ValueError(f"{file}: conversation {cid!r} has no 'messages' list") from None
        start, prev = len(texts), None
        for run in runs:
            for msg in run:
                s = sender_ix.setdefault(msg["sender"], len(sender_ix))
                if s == len(utterances):
                    utterances.append(0)
                utterances[s] += 1
                text = msg["text"].strip()
                if not text:
                    continue
                if s == prev:  # same sender again: one turn
                    texts[-1] += TURN_SEPARATOR + text
                    continue
                texts.append(text)
                t_conv.append(ci)
                t_sender.append(s)
                t_start.append(start)
                prev = s
    # Speaker indices by sorted id, so they do not depend on the file's order.
    names = sorted(sender_ix)
    remap = np.empty(len(names), dtype=np.int32)
    for new, name in enumerate(names):
        remap[sender_ix[name]] = new
    counts = np.zeros(len(names), dtype=np.int64)
    counts[remap] = utterances
    return Dialogues(conv_ids, tuple(names), counts, np.asarray(t_conv, dtype=np.int32),
                     remap[np.asarray(t_sender, dtype=np.int64)], np.asarray(t_start, dtype=np.int64), tuple(texts))


# Dialogue datasets and their parsers (the registry's loader returns the turns as a datasets.Dataset).
DIALOGUE_SOURCES = {"chitchat": load_dialogues}


def dialogues_of(dataset: str, path: str | None) -> Dialogues:
    if dataset not in DIALOGUE_SOURCES:
        raise KeyError(f"{dataset!r} is not a dialogue dataset; dialogue datasets: {', '.join(DIALOGUE_SOURCES)}")
    return DIALOGUE_SOURCES[dataset](path)


@register_dataset(
    "chitchat",
    num_classes=1,
    image_shape=(),
    modality="llm",
    description="Chit Chat Challenge human-human dialogues (BYU PCC lab; PyPI chitchat-dataset 0.9.0, MIT): "
    "7,168 conversations, 258,145 messages by 1,315 speakers (263 with >= 100 messages). One client per "
    "speaker (data.partitioner.name=natural_id, id_column=user); an example is the preceding turn(s) as "
    "chat context and the speaker's next turn as target; split by conversation. Offline.",
)
def load_chitchat(path: str | None = None):
    """The turns as a ``datasets.Dataset``: ``user`` (speaker id), ``conversation`` (index), ``turn``
    (position in the conversation), ``text``. Federations are built from :func:`load_dialogues`."""
    from datasets import Dataset

    d = load_dialogues(path)
    return Dataset.from_dict({
        "user": [d.speakers[s] for s in d.turn_speaker],
        "conversation": d.turn_conv,
        "turn": np.arange(len(d.turn_text)) - d.turn_start,
        "text": list(d.turn_text),
    })


def eligible_speakers(d: Dialogues, min_utterances: int, min_examples: int) -> np.ndarray:
    """Sorted indices of the speakers a federation may use (see the module docstring)."""
    examples, convs = d.speaker_stats()
    ok = (d.utterances >= min_utterances) & (convs >= 2) & (examples >= max(1, min_examples))
    return np.flatnonzero(ok)


def too_few_speakers(dataset: str, n_eligible: int, n_speakers: int, min_utterances: int, min_examples: int,
                     num_clients: int) -> str:
    return (f"{n_eligible} of {dataset}'s {n_speakers} speakers are eligible (at least {min_utterances} messages, "
            f"examples in at least 2 conversations so train and test come from different conversations, and "
            f"at least data.min_client_size={min_examples} examples); run.num_clients={num_clients} needs "
            f"{num_clients}: lower data.dialogue.min_utterances or run.num_clients")


def choose_speakers(d: Dialogues, dataset: str, min_utterances: int, min_examples: int, num_clients: int,
                    speaker_seed: int) -> np.ndarray:
    """``num_clients`` eligible speaker indices: the first of a permutation seeded by ``speaker_seed``."""
    from fedpers.errors import DataError

    elig = eligible_speakers(d, min_utterances, min_examples)
    if len(elig) < num_clients:
        raise DataError(f"data.dialogue.min_utterances={min_utterances}: "
                        + too_few_speakers(dataset, len(elig), len(d.speakers), min_utterances, min_examples,
                                           num_clients))
    order = np.random.default_rng(speaker_seed).permutation(len(elig))
    return elig[order[:num_clients]]


def split_by_conversation(d: Dialogues, turns: np.ndarray, test_fraction: float,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) example turn indices of one speaker, whole conversations on each side. In a seeded
    order, a conversation goes to test when it brings the test size closer to ``test_fraction`` of the
    examples; at least one conversation is on each side (the smallest goes to test if none did)."""
    convs, counts = np.unique(d.turn_conv[turns], return_counts=True)
    if len(convs) < 2:
        raise ValueError("a speaker needs examples in at least 2 conversations")
    target = test_fraction * len(turns)
    picked: list[int] = []
    size = 0
    for c in rng.permutation(len(convs)).tolist():
        if abs(size + counts[c] - target) < abs(size - target):
            picked.append(c)
            size += counts[c]
    if not picked:
        picked = [int(np.argmin(counts))]
    if len(picked) == len(convs):
        picked.pop()
    is_test = np.isin(d.turn_conv[turns], convs[picked])
    return np.sort(turns[~is_test]), np.sort(turns[is_test])
