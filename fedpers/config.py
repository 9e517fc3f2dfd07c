"""Typed, validated run configuration.

Configs are dataclasses. Users give YAML files and ``key=value`` overrides; omegaconf merges them
onto the dataclass schema (rejecting unknown keys and wrong types), then :func:`validate` checks
ranges and allowed names. The ``strategy`` section is validated against the chosen strategy's own
dataclass, so each algorithm owns its hyper-parameters (``strategy.server_lr``, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Every flwr-datasets label/quantity partitioner that applies to a labelled dataset (registry:
# fedpers.data.schemes); the vertical and continuous ones do not split a labelled image set.
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard", "inner_dirichlet", "size", "linear", "square",
                "exponential", "natural_id")
SHIFTS = ("none", "domain", "concept")
MODALITIES = ("vision", "text")
ADAPTERS = ("prompt", "prefix", "lora")
ENGINES = ("flower", "fast", "inprocess")
DEVICES = ("cpu", "cuda", "cuda:N")


class ConfigError(ValueError):
    """A config field has a bad value. ``field`` is the dotted key."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"config field '{field_name}': {message}")


@dataclass
class RunConfig:
    seed: int = 0  # seeds partitioning, initialisation, client sampling and local training
    rounds: int = 20  # federated rounds
    num_clients: int = 10  # clients (= partitions of the dataset)
    clients_per_round: int = 10  # clients sampled each round (without replacement)
    output_dir: str = "results/default"  # results folder (config, metrics.jsonl, summary.json, plots)
    engine: str = "flower"  # flower: Flower simulation engine (realism); fast: one process, no messages (inprocess = alias)
    min_replies: int = 1  # a round with fewer valid replies is not applied to the server state
    client_timeout_s: float = 600.0  # how long the server waits for a round's replies
    max_upload_mb: float = 64.0  # replies whose arrays exceed this are rejected
    progress: bool = True  # show a progress bar over rounds
    tensorboard: bool = False  # also write per-round scalars and the plots as TensorBoard event files in <output_dir>/tensorboard
    num_cpus_per_client: float = 1.0  # Flower engine: CPU share of each simulated client
    checkpoint_every: int = 1  # save server state to <output_dir>/checkpoint.pt every k rounds (0 = never)
    resume: bool = False  # continue from <output_dir>/checkpoint.pt (run.rounds may grow; other fields must match)
    holdout_clients: float = 0.0  # unseen clients, never trained, personalized after training: a fraction in (0, 1) or a whole count >= 1 (0 = none)
    unseen_rounds: int = 3  # exchanges in which each held-out client adapts to the frozen trained server state
    cache: bool = True  # exact per-process caches of frozen computation (patch embeddings, frozen features)
    cache_mb: float = 1024.0  # memory budget of those caches per process; clients past it are recomputed
    workers: int = 1  # fast engine: processes that train a round's clients in parallel (1 = this process; each of N gets its share of the free cores as torch threads)
    threads: int = 0  # fast engine and its workers: torch threads per process; 0 = auto (OMP_NUM_THREADS if set, else the cores other processes leave free, re-checked every round; see fedpers/threads.py)
    batch_clients: bool = False  # fast engine: train a round's clients together in mixed batches
    batch_max_samples: int = 1024  # batch_clients: most samples in one mixed forward/backward (clients grouped)
    device: str = "cpu"  # batch_clients: torch device of the batched trainer (cpu | cuda | cuda:N)


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
class DataConfig:
    dataset: str = "digits"  # registered dataset name (see fedpers.data.list_datasets())
    path: Optional[str] = None  # local copy of a hub dataset (a Dataset.save_to_disk folder); None = download
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    test_fraction: float = 0.2  # share of each client's partition held out as its personal test split
    min_test_size: int = 1  # a client whose test split is smaller than this is too small
    min_client_size: int = 2  # a client with fewer samples (train + test) is too small
    small_client_policy: str = "error"  # too-small clients: error (fail with a message) | rebalance (move samples from the largest clients)


@dataclass
class LoraModelConfig:
    r: int = 8  # LoRA rank (hetlora: the largest rank; per-client ranks are strategy.ranks)
    alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / r) * B A
    targets: list[str] = field(default_factory=lambda: ["query", "value"])  # module names LoRA wraps (peft target_modules)


@dataclass
class ModelConfig:
    modality: str = "vision"  # vision: timm ViT + visual prompts | text: Hugging Face language model + peft adapter
    backbone: str = "vit_fedpers_digits"  # vision: any timm ViT name; text: a hub model name or local folder (offline default: all-MiniLM-L6-v2)
    adapter: str = "prompt"  # prompt: soft/visual prompts | prefix: prefix tuning (text) | lora: LoRA (text)
    max_length: int = 64  # text: tokens per example (truncated / padded)
    lora: LoraModelConfig = field(default_factory=LoraModelConfig)
    pretrained: bool = True  # load the backbone's pretrained weights (timm hub or fedpers' bundled file)
    checkpoint: Optional[str] = None  # local weights file for the backbone (overrides pretrained)
    num_prompts: int = 10  # K prompts: visual prompts after the [CLS] token; text: soft-prompt / prefix virtual tokens
    prompt_init_std: float = 0.5  # std of randomly initialised prompts (fedvpt, local)
    img_size: Optional[int] = None  # backbone input size in pixels (images are resized to it); default: the backbone's own


@dataclass
class ClientConfig:
    local_epochs: int = 2  # passes over the client's train split per round
    lr: float = 0.03  # SGD learning rate for prompts and head
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-3  # SGD weight decay on prompts and head
    batch_size: int = 32  # local mini-batch size


@dataclass
class DPConfig:
    clip_norm: float = 0.0  # L2 bound on each client's delta (all tensors jointly); 0 = DP off
    noise_multiplier: float = 0.0  # Gaussian noise std = noise_multiplier * clip_norm, added on the client
    delta: float = 1e-5  # the delta of the reported (epsilon, delta) guarantee
    seeded_noise: bool = False  # derive noise from run.seed for reproducible simulations (no privacy: whoever knows the seed can remove it)


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    # Validated against the strategy's own dataclass (strategies.get_config_cls(name)).
    strategy: Any = field(default_factory=lambda: {"name": "pfedpg"})


def _schema() -> DictConfig:
    return OmegaConf.structured(ExperimentConfig)


def _strategy_config(raw: Any) -> Any:
    from strategies import get_strategy_class, list_strategies

    raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    name = raw.get("name", "pfedpg")
    try:
        cls = get_strategy_class(name)
    except KeyError:
        raise ConfigError("strategy.name", f"unknown strategy {name!r}; allowed: {', '.join(list_strategies())}") from None
    schema = OmegaConf.structured(cls.config_cls)
    try:
        merged = OmegaConf.merge(schema, raw)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"strategy.{key}", _clean(e)) from None
    return obj


def _clean(e: Exception) -> str:
    return str(e).split("\n")[0]


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file + dotlist overrides -> validated ExperimentConfig. Raises ConfigError."""
    layers = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {path}")
        layers.append(OmegaConf.load(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(bad[0], "overrides must look like key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    return from_layers(layers)


def from_layers(layers: list[Any]) -> ExperimentConfig:
    """Merge layers (dicts/DictConfigs) onto the schema and validate."""
    base = _schema()
    strategy_layers = []
    for layer in layers:
        layer = OmegaConf.create(layer) if not isinstance(layer, DictConfig) else layer
        layer = layer.copy()
        if "strategy" in layer:
            strategy_layers.append(layer.pop("strategy"))
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(key, _clean(e)) from None
    strat = OmegaConf.merge({"name": "pfedpg"}, *strategy_layers) if strategy_layers else {"name": "pfedpg"}
    cfg: ExperimentConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    cfg.strategy = _strategy_config(strat)
    validate(cfg)
    return cfg


def holdout_count(r: RunConfig) -> int:
    """How many clients ``run.holdout_clients`` holds out (a fraction rounds, to at least one client)."""
    h = r.holdout_clients
    if h <= 0:
        return 0
    if h < 1:
        return max(1, int(round(h * r.num_clients)))
    return int(h)


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def validate(cfg: ExperimentConfig) -> None:
    """Range and name checks that a type schema cannot express."""
    from fedpers.data import get_dataset_info, list_datasets
    from strategies import get_strategy_class

    r, d, m, c = cfg.run, cfg.data, cfg.model, cfg.client
    _require(r.rounds >= 1, "run.rounds", f"must be >= 1, got {r.rounds}")
    _require(r.num_clients >= 1, "run.num_clients", f"must be >= 1, got {r.num_clients}")
    h = r.holdout_clients
    _require(h >= 0 and (h < 1 or float(h).is_integer()), "run.holdout_clients",
             f"must be 0, a fraction in (0, 1) or a whole count >= 1, got {h}")
    n_train = r.num_clients - holdout_count(r)
    _require(n_train >= 1, "run.holdout_clients",
             f"holds out {holdout_count(r)} of run.num_clients={r.num_clients}: no client left to train")
    _require(r.unseen_rounds >= 1, "run.unseen_rounds", f"must be >= 1, got {r.unseen_rounds}")
    _require(
        1 <= r.clients_per_round <= n_train,
        "run.clients_per_round",
        f"must be in [1, {n_train}] (run.num_clients={r.num_clients} minus "
        f"{holdout_count(r)} held out), got {r.clients_per_round}",
    )
    _require(
        1 <= r.min_replies <= r.clients_per_round,
        "run.min_replies",
        f"must be in [1, run.clients_per_round={r.clients_per_round}], got {r.min_replies}",
    )
    _require(r.engine in ENGINES, "run.engine", f"unknown engine {r.engine!r}; allowed: {', '.join(ENGINES)}")
    _require(r.client_timeout_s > 0, "run.client_timeout_s", f"must be > 0, got {r.client_timeout_s}")
    _require(r.max_upload_mb > 0, "run.max_upload_mb", f"must be > 0, got {r.max_upload_mb}")
    _require(r.num_cpus_per_client > 0, "run.num_cpus_per_client", f"must be > 0, got {r.num_cpus_per_client}")
    _require(bool(r.output_dir), "run.output_dir", "must not be empty")
    _require(r.checkpoint_every >= 0, "run.checkpoint_every", f"must be >= 0 (0 = never), got {r.checkpoint_every}")
    _require(r.cache_mb >= 0, "run.cache_mb", f"must be >= 0, got {r.cache_mb}")
    _require(r.batch_max_samples >= 1, "run.batch_max_samples", f"must be >= 1, got {r.batch_max_samples}")
    _require(r.workers >= 1, "run.workers", f"must be >= 1, got {r.workers}")
    _require(r.threads >= 0, "run.threads", f"must be >= 0 (0 = auto), got {r.threads}")
    if r.tensorboard:
        import importlib.util

        _require(importlib.util.find_spec("tensorboard") is not None, "run.tensorboard",
                 "needs the tensorboard package (pip install tensorboard), or set it to false")
    _require(r.workers == 1 or r.engine != "flower", "run.workers",
             "needs run.engine=fast (the Flower engine sizes its worker pool with run.num_cpus_per_client)")
    _require(r.workers == 1 or not r.batch_clients, "run.workers",
             "run.batch_clients trains a round's clients together in this process; use one or the other")
    _require(not r.batch_clients or r.engine != "flower", "run.batch_clients",
             "needs run.engine=fast (Flower runs each client in its own ClientApp call)")
    _require(r.device == "cpu" or r.device == "cuda" or (r.device.startswith("cuda:") and r.device[5:].isdigit()),
             "run.device", f"unknown device {r.device!r}; allowed: {', '.join(DEVICES)}")
    _require(r.device == "cpu" or r.batch_clients, "run.device",
             "only the batched trainer runs off the CPU; set run.batch_clients=true")

    datasets = list_datasets()
    _require(d.dataset in datasets, "data.dataset", f"unknown dataset {d.dataset!r}; allowed: {', '.join(datasets)}")
    if d.path is not None:
        _require(Path(d.path).is_dir(), "data.path", f"not a directory: {d.path}")
    from fedpers.data.schemes import validate_data

    validate_data(cfg)

    _require(m.modality in MODALITIES, "model.modality", f"unknown modality {m.modality!r}; allowed: {', '.join(MODALITIES)}")
    _require(m.adapter in ADAPTERS, "model.adapter", f"unknown adapter {m.adapter!r}; allowed: {', '.join(ADAPTERS)}")
    _require(m.modality == "text" or m.adapter == "prompt", "model.adapter",
             f"{m.adapter!r} needs model.modality=text; vision supports: prompt")
    _require(m.modality != "text" or d.shift.name != "domain", "data.shift.name",
             "domain shift transforms images; with model.modality=text use: none, concept")
    data_modality = get_dataset_info(d.dataset).modality
    _require(data_modality == m.modality, "model.modality",
             f"{m.modality!r} does not match dataset {d.dataset!r}, which is {data_modality}")
    _require(m.max_length >= 2, "model.max_length", f"must be >= 2, got {m.max_length}")
    _require(m.lora.r >= 1, "model.lora.r", f"must be >= 1, got {m.lora.r}")
    _require(m.lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {m.lora.alpha}")
    _require(len(m.lora.targets) >= 1, "model.lora.targets", "must name at least one module")
    _require(bool(m.backbone), "model.backbone", "must name a timm ViT or a Hugging Face model")
    _require(m.num_prompts >= 1, "model.num_prompts", f"must be >= 1, got {m.num_prompts}")
    _require(m.prompt_init_std >= 0, "model.prompt_init_std", f"must be >= 0, got {m.prompt_init_std}")
    _require(m.img_size is None or m.img_size >= 1, "model.img_size", f"must be >= 1, got {m.img_size}")
    if m.checkpoint is not None:
        _require(Path(m.checkpoint).is_file(), "model.checkpoint", f"file not found: {m.checkpoint}")

    _require(c.local_epochs >= 1, "client.local_epochs", f"must be >= 1, got {c.local_epochs}")
    _require(c.lr > 0, "client.lr", f"must be > 0, got {c.lr}")
    _require(0 <= c.momentum < 1, "client.momentum", f"must be in [0, 1), got {c.momentum}")
    _require(c.weight_decay >= 0, "client.weight_decay", f"must be >= 0, got {c.weight_decay}")
    _require(c.batch_size >= 1, "client.batch_size", f"must be >= 1, got {c.batch_size}")
    dp = cfg.dp
    _require(dp.clip_norm >= 0, "dp.clip_norm", f"must be >= 0 (0 = DP off), got {dp.clip_norm}")
    _require(dp.noise_multiplier >= 0, "dp.noise_multiplier", f"must be >= 0, got {dp.noise_multiplier}")
    _require(dp.noise_multiplier == 0 or dp.clip_norm > 0, "dp.noise_multiplier",
             "noise needs a clipping bound: set dp.clip_norm > 0")
    _require(0 < dp.delta < 1, "dp.delta", f"must be in (0, 1), got {dp.delta}")
    scls = get_strategy_class(cfg.strategy.name)
    _require(m.modality in scls.modalities, "model.modality",
             f"strategy {scls.name!r} supports {', '.join(scls.modalities)}, not {m.modality!r}")
    _require(m.adapter in scls.adapters, "model.adapter",
             f"strategy {scls.name!r} supports adapters {', '.join(scls.adapters)}, not {m.adapter!r}")
    validate_strategy = getattr(cfg.strategy, "validate", None)
    if validate_strategy is not None:
        validate_strategy()
    validate_against = getattr(cfg.strategy, "validate_with", None)  # checks that need the rest of the config
    if validate_against is not None:
        validate_against(cfg)


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def from_yaml(text: str) -> ExperimentConfig:
    return from_layers([OmegaConf.create(text)])
