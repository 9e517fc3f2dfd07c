"""The data layer's configuration schema: ``data.*`` fields and the partitioner and shift names.

A leaf module (standard library only) so that :mod:`fedpers.config` can compose it into the run
config and every module of :mod:`fedpers.data` can type against it without either importing the
other's package: the data modules never import :mod:`fedpers.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Every flwr-datasets label/quantity partitioner that applies to a labelled dataset (registry:
# fedpers.data.schemes); the vertical and continuous ones do not split a labelled image set.
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard", "inner_dirichlet", "size", "linear", "square",
                "exponential", "natural_id")
SHIFTS = ("none", "domain", "concept")


@dataclass
class PartitionerConfig:
    name: str = "dirichlet"  # iid | dirichlet | pathological | shard | inner_dirichlet | size | linear | square | exponential | natural_id
    alpha: float = 0.1  # dirichlet, inner_dirichlet: concentration (smaller = more label skew)
    min_partition_size: int = 10  # dirichlet: resample until every client has this many samples
    self_balancing: bool = False  # dirichlet: stop adding to clients above the average size
    num_classes_per_partition: int = 2  # pathological: classes per client
    class_assignment_mode: str = "first-deterministic"  # pathological: first-deterministic | random | deterministic
    num_shards_per_partition: Optional[int] = 2  # shard: shards (label-sorted slices) per client; None = from shard_size
    shard_size: Optional[int] = None  # shard: samples per shard; None = as large as the shard count allows
    keep_incomplete_shard: bool = False  # shard: also hand out the last, smaller shard
    partition_sizes: Optional[list[int]] = None  # size, inner_dirichlet: samples per client (run.num_clients values); None = equal split
    id_column: str = "client_id"  # natural_id: dataset column naming each sample's client or domain (one client per value)


@dataclass
class ShiftConfig:
    name: str = "none"  # none | domain (per-client image transforms) | concept (per-client label maps)
    num_groups: int = 0  # clients sharing one domain/concept: client i is in group i % num_groups; 0 = one per client
    transforms: list[str] = field(default_factory=lambda: ["rotate", "contrast", "blur", "noise", "invert"])  # domain: composed per group, from rotate|contrast|color|blur|noise|invert
    strength: float = 1.0  # domain: scales every transform's magnitude (0 = no change)
    concept_mode: str = "permute"  # concept: permute (random relabelling; invisible to private zero-init heads) | group (classes merged into num_label_groups labels)
    num_label_groups: int = 2  # concept_mode=group: how many labels each group's classes collapse into


@dataclass
class DialogueConfig:
    min_utterances: int = 100  # dialogue datasets (chitchat): a speaker is eligible with at least this many messages; 100 keeps 263 prolific speakers (enough own text to train and test on), 253 of them with examples in 2+ conversations (eligible)
    context_turns: int = 1  # dialogue: preceding turns of the conversation in each example's context, oldest first; 1 = the partner's last turn, so every context is one user turn, as strict chat templates want
    speaker_seed: int = 0  # dialogue: seeds the draw of run.num_clients speakers among the eligible ones; fixed apart from run.seed, so every seed and strategy sees the same speakers, and N speakers are the first N of a larger draw


@dataclass
class DataConfig:
    dataset: str = "digits"  # registered dataset name (see fedpers.data.list_datasets())
    path: Optional[str] = None  # local copy of a hub dataset (a Dataset.save_to_disk folder); None = download
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    test_fraction: float = 0.2  # share of each client's partition held out as its personal test split
    val_fraction: float = 0.0  # share of each client's partition held out as its validation split, carved from the non-test rows (seeded by run.seed and the client, the same for every strategy; dialogue: whole conversations, and a speaker whose training replies are one conversation keeps it whole and has no validation split). Evaluated every round (val_* metrics) so a round or a variant is chosen on validation, never on test; 0 = no validation split
    min_test_size: int = 1  # a client whose test split is smaller than this is too small
    min_client_size: int = 2  # a client with fewer samples (train + test) is too small
    small_client_policy: str = "error"  # too-small clients: error (fail with a message) | rebalance (move samples from the largest clients)
    max_train_per_client: int = 0  # cap on each client's training examples after partitioning and the train/test split (a seeded subsample; the test split is untouched); 0 = no cap. Any dataset; few-shot chitchat runs use e.g. 32
    max_test_per_client: int = 0  # cap on each client's test examples (a seeded subsample, fixed per client and seed, the same for every strategy); 0 = no cap. For evaluation cost, e.g. LLM grids on a CPU: an LLM speaker's test split can hold 150+ replies
    max_val_per_client: int = 0  # cap on each client's validation examples (data.val_fraction; a seeded subsample, fixed per client and seed, the same for every strategy); 0 = no cap. Validation is scored every round: on an LLM speaker with hundreds of replies, cap it as the test split is capped
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)  # dialogue datasets (modality llm, e.g. chitchat): speaker filter, context length, speaker draw
