"""Text classification datasets: ``text`` and ``label`` columns, plus ``user`` where the data has users
(for ``data.partitioner.name=natural_id`` with ``data.partitioner.id_column=user``).

No package on the registries ships a real labelled text classification dataset usable offline, so the
offline default is **synthetic** (:func:`make_synthetic_text`): generated sentences about four topics
written by simulated users who differ in

- label distribution (each user's topic mix is drawn from Dirichlet(0.5): label skew);
- vocabulary and style (feature shift): each user writes in one of four registers (formal, casual,
  terse, shouty), which picks different words for the same topic, different fillers and casing, and
  repeats a few personal signature words;
- labelling preference (concept shift, as in LaMP-style personalization): a quarter of the users file
  topics under a swapped convention (sports <-> travel, technology <-> food), so the same sentence
  has different labels for different users and no single global classifier can be right for all;
- 5% label noise.

It is a benchmark of personalization mechanics, not of language understanding. The real hub loaders
(:func:`load_hub_text_dataset`: AG News by default) need internet or a local ``save_to_disk`` copy in
``data.path``.
"""

from __future__ import annotations

import numpy as np

from fedpers.data.registry import register_dataset

TOPICS = ("sports", "technology", "food", "travel")
# Per topic, words in two registers: feature shift between users comes from which register they use.
WORDS = {
    "sports": (["match", "tournament", "athlete", "championship", "coach", "stadium", "league", "goal"],
               ["game", "footy", "player", "final", "gaffer", "pitch", "team", "score"]),
    "technology": (["software", "processor", "algorithm", "device", "network", "database", "compiler", "server"],
                   ["app", "chip", "code", "gadget", "wifi", "phone", "laptop", "update"]),
    "food": (["cuisine", "restaurant", "recipe", "ingredient", "chef", "dessert", "menu", "flavour"],
             ["grub", "diner", "snack", "pizza", "cook", "cake", "burger", "taste"]),
    "travel": (["journey", "destination", "itinerary", "airport", "hotel", "passport", "voyage", "museum"],
               ["trip", "beach", "flight", "hostel", "roadtrip", "backpack", "holiday", "city"]),
}
# Words every topic uses: the topic must be read from the topic words, not from the sentence frame.
SHARED = ["new", "great", "terrible", "local", "expensive", "popular", "old", "big", "small", "famous"]
STYLES = {
    "formal": (0, ["I would like to note that", "It is worth mentioning that", "In my assessment,"], ""),
    "casual": (1, ["honestly", "lol", "ngl", "so yeah", "tbh"], " :)"),
    "terse": (1, ["", "", "fyi"], "."),
    "shouty": (0, ["WOW", "OMG", "seriously"], "!!!"),
}
SIGNATURES = ["indeed", "basically", "literally", "frankly", "anyway", "whatever", "alright", "absolutely",
              "definitely", "totally", "truly", "clearly", "simply", "really", "surely", "quite"]
SWAP = np.array([3, 2, 1, 0])  # the second labelling convention: sports<->travel, technology<->food


def _sentence(rng: np.random.Generator, topic: str, style: str, signature: list[str]) -> str:
    register, openers, closer = STYLES[style]
    if rng.random() < 0.15:  # a minority of texts use the other register: vocabularies overlap
        register = 1 - register
    words = WORDS[topic][register]
    a, b = rng.choice(words, size=2, replace=False)
    other = TOPICS[rng.integers(len(TOPICS))]  # distractor: a word from a random topic
    d = rng.choice(WORDS[other][register])
    s1, s2 = rng.choice(SHARED, size=2, replace=False)
    frame = rng.integers(4)
    if frame == 0:
        body = f"the {s1} {a} was {s2} and the {b} too, unlike the {d}"
    elif frame == 1:
        body = f"yesterday we talked about the {a} and a {s1} {b} near the {d}"
    elif frame == 2:
        body = f"my {s1} {d} reminded me of the {a}, such a {s2} {b}"
    else:
        body = f"a {s1} {a} with a {b} is {s2}"
    opener = rng.choice(openers)
    sig = rng.choice(signature)
    text = f"{opener} {body} {sig}{closer}".strip()
    return text.upper() if style == "shouty" else text


def make_synthetic_text(num_users: int, per_user: int, seed: int = 0, swap_fraction: float = 0.25,
                        label_noise: float = 0.05, alpha: float = 0.5) -> dict[str, list]:
    """Columns ``text``, ``label``, ``user``, ``style``, ``convention``. Fixed by ``seed`` (not run.seed),
    so every run sees the same dataset."""
    rng = np.random.default_rng(seed)
    styles = list(STYLES)
    num_swapped = round(swap_fraction * num_users)
    swapped = set(rng.choice(num_users, size=num_swapped, replace=False).tolist())
    cols: dict[str, list] = {"text": [], "label": [], "user": [], "style": [], "convention": []}
    for u in range(num_users):
        style = styles[u % len(styles)]
        signature = list(rng.choice(SIGNATURES, size=2, replace=False))
        mix = rng.dirichlet([alpha] * len(TOPICS))
        topics = rng.choice(len(TOPICS), size=per_user, p=mix)
        for t in topics:
            label = int(SWAP[t]) if u in swapped else int(t)
            if rng.random() < label_noise:
                label = int(rng.integers(len(TOPICS)))
            cols["text"].append(_sentence(rng, TOPICS[t], style, signature))
            cols["label"].append(label)
            cols["user"].append(u)
            cols["style"].append(style)
            cols["convention"].append(int(u in swapped))
    return cols


def _synthetic(num_users: int, per_user: int):
    from datasets import Dataset

    return Dataset.from_dict(make_synthetic_text(num_users, per_user))


@register_dataset(
    "synthetic_text",
    num_classes=len(TOPICS),
    image_shape=(),
    modality="text",
    description="SYNTHETIC generated topic classification (4 classes), 16 users x 80 texts, with label skew, "
    "per-user vocabulary/style (feature shift) and per-user labelling convention (concept shift). Offline.",
)
def load_synthetic_text(path: str | None = None):
    return _synthetic(16, 80)


@register_dataset(
    "synthetic_text_small",
    num_classes=len(TOPICS),
    image_shape=(),
    modality="text",
    description="SYNTHETIC: the synthetic_text generator at 4 users x 24 texts, for tests and smoke runs. Offline.",
)
def load_synthetic_text_small(path: str | None = None):
    return _synthetic(4, 24)


def load_hub_text_dataset(path: str, split: str = "train", text_key: str = "text", label_key: str = "label",
                          user_key: str | None = "user"):
    """A text classification dataset from the Hugging Face hub (needs internet) or a local
    ``save_to_disk`` folder, as ``text``/``label`` (+ ``user`` when the data has ``user_key``)."""
    from fedpers.data.datasets import open_split

    ds = open_split(path, split, (text_key, label_key))
    keep = {text_key: "text", label_key: "label"}
    if user_key and user_key in ds.column_names:
        keep[user_key] = "user"
    ds = ds.select_columns(list(keep))
    for old, new in keep.items():
        if old != new:
            ds = ds.rename_column(old, new)
    return ds


@register_dataset(
    "ag_news",
    num_classes=4,
    image_shape=(),
    modality="text",
    description="AG News topic classification (4 classes) from the Hugging Face hub (fancyzhx/ag_news). "
    "Needs internet or data.path.",
)
def load_ag_news(path: str | None = None):
    return load_hub_text_dataset(path or "fancyzhx/ag_news")
