"""Typed run configuration: the floor every other module stands on.

Configs are dataclasses. Users give YAML files and ``key=value`` overrides; omegaconf merges them
onto the dataclass schema (:func:`merge_layers`, rejecting unknown keys and wrong types), then
:func:`check_fields` checks the ranges of the config's own fields. This module imports no registry:
resolving the ``strategy`` section against the chosen strategy's own dataclass (each algorithm owns its
hyper-parameters, ``strategy.server_lr``, ...) and the checks that need the strategy or dataset
registries live one floor up, in :mod:`fedpers.experiment`, whose ``load_config`` / ``from_yaml`` /
``from_layers`` are the loaders callers use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedpers.data.config import (  # noqa: F401  (re-exported: the data layer owns the data.* schema)
    PARTITIONERS,
    SHIFTS,
    DataConfig,
    PartitionerConfig,
    ShiftConfig,
)
from fedpers.errors import ConfigError  # re-exported: callers import fedpers.config.ConfigError

MODALITIES = ("vision", "text", "llm")
ADAPTERS = ("prompt", "prefix", "lora")
ENGINES = ("flower", "fast", "inprocess")
DEVICES = ("cpu", "cuda", "cuda:N")
SECTIONS = ("run", "data", "model", "client", "dp", "strategy")


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
    num_gpus_per_client: float = 0.0  # Flower engine: GPU share of each simulated client (0.5 = two clients per GPU)
    ray_address: Optional[str] = None  # Flower engine: run the clients on this existing Ray cluster (HOST:PORT or auto); None = start a local Ray
    checkpoint_every: int = 1  # save server state to <output_dir>/checkpoint.pt every k rounds (0 = never)
    resume: bool = False  # continue from <output_dir>/checkpoint.pt (run.rounds may grow; other fields must match); a finished run at run.rounds is left untouched (exit 0, says so)
    holdout_clients: float = 0.0  # unseen clients, never trained, personalized after training: a fraction in (0, 1) or a whole count >= 1 (0 = none)
    unseen_rounds: int = 3  # exchanges in which each held-out client adapts to the frozen trained server state
    cache: bool = True  # exact per-process caches of frozen computation (patch embeddings, frozen features)
    cache_mb: float = 1024.0  # memory budget of those caches per process; clients past it are recomputed
    workers: int = 1  # fast engine: processes that train a round's clients in parallel (1 = this process; each of N gets its share of the free cores as torch threads)
    threads: int = 0  # fast engine and its workers: torch threads per process; 0 = auto (OMP_NUM_THREADS if set, else the cores other processes leave free, re-checked every round; see fedpers/rounds/threads.py)
    batch_clients: bool = False  # fast engine: train a round's clients together in mixed batches
    batch_max_samples: int = 1024  # batch_clients: most samples in one mixed forward/backward (clients grouped)
    device: str = "cpu"  # torch device (cpu | cuda | cuda:N) of the batched trainer (batch_clients) and of the frozen LLM (model.modality=llm)
    overwrite: bool = False  # allow a fresh run into an output_dir that already holds a run: the old run is moved aside, put back if the new one fails before its first round, deleted after it; otherwise that is refused
    max_delta_norm: float = 1e4  # replies whose delta (all tensors jointly) has a larger L2 norm are rejected before they touch server state
    max_num_examples: int = 100_000  # a reply claiming more examples counts as this many in weighted aggregation
    max_memory_gb: float = 32.0  # refuse to start when a lower bound of client + server tensor and activation memory exceeds this
    cross_eval: bool = False  # after the last round, score every trained client's personal model on every client's test split (cross_eval.csv, cross_eval.png, final.cross_eval in summary.json); models move between clients, so a simulation diagnostic
    cross_eval_clients: int = 0  # run.cross_eval on a sample: N trained clients drawn once (seeded by run.seed), each one's personal model scored on each of the N's test splits (N x N instead of every trained model on every client; an LLM grid's cross-evaluation is otherwise hours on a CPU); 0 = all


@dataclass
class LoraModelConfig:
    r: int = 8  # LoRA rank (hetlora: the largest rank; per-client ranks are strategy.ranks)
    alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / r) * B A
    targets: list[str] = field(default_factory=lambda: ["query", "value"])  # module names LoRA wraps (peft target_modules)


@dataclass
class LlmModelConfig:
    context_tokens: int = 96  # llm: prompt budget in tokens (chat template and system prompt included); the most recent whole turns that fit are kept
    target_tokens: int = 32  # llm: reply budget in tokens (end-of-turn token included); longer replies are cut
    system_prompt: str = "You are a helpful assistant."  # llm: the system turn of every example (a short one: a template's own default can cost tens of tokens)
    adapter_from_layer: int = 0  # llm: the adapter acts from decoder layer L up (LoRA on layers >= L; soft prompts prepended to the hidden states entering layer L, late prompts); the frozen layers below run once per example and are cached exactly within run.cache_mb (0 = from the input; prefix tuning needs 0)
    lora_from_layer: int = 0  # llm: the older, LoRA-only name of adapter_from_layer (read when adapter_from_layer is 0)
    generations: int = 3  # llm: greedy replies to this many test examples per client written to <output_dir>/generations/ after the last round (0 = none)
    max_new_tokens: int = 32  # llm: longest generated reply


@dataclass
class ModelConfig:
    modality: str = "vision"  # vision: timm ViT + visual prompts | text: Hugging Face language model + peft adapter
    backbone: str = "vit_fedpers_digits"  # vision: any timm ViT name; text: a hub model name or local folder (offline default: all-MiniLM-L6-v2)
    adapter: str = "prompt"  # prompt: soft/visual prompts | prefix: prefix tuning (text, llm) | lora: LoRA (text, llm) | auto: the strategy's first supported adapter (resolved when the config loads; config.yaml records the result)
    max_length: int = 64  # text: tokens per example (truncated / padded)
    lora: LoraModelConfig = field(default_factory=LoraModelConfig)
    llm: LlmModelConfig = field(default_factory=LlmModelConfig)
    pretrained: bool = True  # load the backbone's pretrained weights (timm hub or fedpers' bundled file)
    checkpoint: Optional[str] = None  # local weights file for the backbone (overrides pretrained)
    num_prompts: int = 10  # K prompts: visual prompts after the [CLS] token; text: soft-prompt / prefix virtual tokens
    prompt_init_std: float = 0.5  # std of randomly initialised prompts (fedvpt, local)
    img_size: Optional[int] = None  # backbone input size in pixels (images are resized to it); default: the backbone's own


OPTIMIZERS = ("sgd", "adamw")


@dataclass
class ClientConfig:
    local_epochs: int = 2  # passes over the client's train split per round
    optimizer: str = "sgd"  # local optimizer, fresh each round: sgd (momentum, weight_decay) | adamw (torch AdamW, betas 0.9/0.999, decoupled weight_decay; LLM adapters usually want it, e.g. lr 1e-3)
    lr: float = 0.03  # local learning rate for prompts / adapters and head
    momentum: float = 0.9  # SGD momentum (optimizer=sgd)
    weight_decay: float = 1e-3  # weight decay on prompts / adapters and head (adamw: decoupled)
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


@functools.cache
def _structured(cls: type) -> DictConfig:
    """The schema of a config dataclass, built once per class: ``OmegaConf.structured`` costs tens of ms,
    which a sweep grid of hundreds of cells pays per cell, and ``OmegaConf.merge`` (its only use here)
    copies its inputs instead of changing them, so one read-only schema serves every config."""
    return OmegaConf.structured(cls)


def _schema() -> DictConfig:
    return _structured(ExperimentConfig)


def _clean(e: Exception) -> str:
    return str(e).split("\n")[0]


def load_yaml_mapping(path: str | Path, field_name: str,
                      keys: str = "config sections (run:, data:, ...)") -> DictConfig:
    """A YAML file whose top level is a mapping; syntax and shape errors name the file and line.
    ``keys``: what the mapping holds, for the message (a sweep grid passes its own keys)."""
    try:
        text = Path(path).read_text()
        shape = yaml.safe_load(text)  # omegaconf asserts (a bare AssertionError) on a scalar document
        if shape is not None and not isinstance(shape, dict):
            raise ConfigError(field_name, f"{path}: the top level must be a mapping of {keys}, "
                                          f"not a {type(shape).__name__}")
        loaded = OmegaConf.create(text) if shape is not None else OmegaConf.create({})
    except UnicodeDecodeError as e:
        raise ConfigError(field_name, f"{path} is not a text file: {e}") from None
    except OSError as e:
        raise ConfigError(field_name, f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(field_name, f"YAML syntax error at {where}: {problem}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(field_name, f"{path}: {_clean(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(field_name, f"{path}: the top level must be a mapping of {keys}, "
                                      f"not a {type(loaded).__name__.removesuffix('Config').lower()}")
    _check_sections(loaded, f"{path}: ")
    return loaded


def _check_sections(layer: DictConfig, where: str = "") -> None:
    """Each config section present is a mapping ("run: 3" would otherwise be an anonymous omegaconf merge
    error); ``where`` prefixes the message (a YAML file's path)."""
    for key in SECTIONS:
        v = layer.get(key)
        _require(v is None or isinstance(v, DictConfig), key,
                 f"{where}must be a mapping of {key}.* fields, got {type(v).__name__}: {v!r}")


def merge_layers(layers: list[Any]) -> tuple[ExperimentConfig, Any]:
    """Merge layers (dicts/DictConfigs) onto the schema: the config with ``strategy`` still unresolved,
    and the merged ``strategy`` section (a DictConfig) that :func:`fedpers.experiment.from_layers` resolves
    against the chosen strategy's own dataclass. Raises ConfigError naming the field."""
    base = _schema()
    strategy_layers = []
    for layer in layers:
        layer = OmegaConf.create(layer) if not isinstance(layer, DictConfig) else layer
        layer = layer.copy()
        if isinstance(layer, DictConfig):
            _check_sections(layer)
        if "strategy" in layer:
            strategy_layers.append(layer.pop("strategy"))
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(key, _clean(e)) from None
    strat = OmegaConf.merge({"name": "pfedpg"}, *strategy_layers) if strategy_layers else OmegaConf.create({"name": "pfedpg"})
    cfg: ExperimentConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    return cfg, strat


def read_layers(config_file: str | Path | None = None, overrides: list[str] | None = None) -> list[Any]:
    """A YAML file and dotlist overrides as layers for :func:`merge_layers`. Raises ConfigError."""
    layers = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {path}")
        layers.append(load_yaml_mapping(path, "--config"))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(bad[0], "overrides must look like key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    return layers


def resolve_section(schema_cls: type, raw: Any, prefix: str) -> Any:
    """A mapping merged onto a config dataclass's schema (unknown keys and wrong types refused)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(_structured(schema_cls), raw))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        message = _clean(e)
        names = [f.name for f in dataclasses.fields(schema_cls)]
        if key not in names and "." not in key and "Did you mean" not in message:  # an unknown field
            close = difflib.get_close_matches(key, names, n=2, cutoff=0.6)
            close += [n for n in names if n not in close and key and (n.endswith("_" + key) or n.startswith(key + "_"))]
            if close:
                message += ". Did you mean: " + ", ".join(f"'{n}'" for n in close) + "?"
            message += f" The {prefix} fields here: {', '.join(names)}"
        raise ConfigError(f"{prefix}.{key}", message) from None


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


def check_fields(cfg: ExperimentConfig) -> None:
    """Range and name checks of the config's own fields that a type schema cannot express. The checks that
    need a registry (is the dataset or strategy known, do they fit the model) live one floor up, in
    :func:`fedpers.experiment.validate`."""

    r, d, m, c = cfg.run, cfg.data, cfg.model, cfg.client
    check_numbers(cfg)
    _require(0 <= r.seed < 2**63, "run.seed", f"must be in [0, 2**63) (torch's seed range), got {r.seed}")
    _require(r.max_delta_norm > 0, "run.max_delta_norm", f"must be > 0, got {r.max_delta_norm}")
    _require(r.max_num_examples >= 1, "run.max_num_examples", f"must be >= 1, got {r.max_num_examples}")
    _require(r.max_memory_gb > 0, "run.max_memory_gb", f"must be > 0, got {r.max_memory_gb}")
    _require(not (r.resume and r.overwrite), "run.overwrite",
             "run.resume=true continues the run in run.output_dir, run.overwrite=true replaces it: choose one")
    _require(r.rounds >= 1, "run.rounds", f"must be >= 1, got {r.rounds}")
    _require(r.num_clients >= 1, "run.num_clients", f"must be >= 1, got {r.num_clients}")
    h = r.holdout_clients
    _require(h >= 0 and (h < 1 or float(h).is_integer()), "run.holdout_clients",
             f"must be 0, a fraction in (0, 1) or a whole count >= 1, got {h}")
    n_train = r.num_clients - holdout_count(r)
    _require(n_train >= 1, "run.holdout_clients",
             f"holds out {holdout_count(r)} of run.num_clients={r.num_clients}: no client left to train")
    _require(r.cross_eval_clients == 0 or 2 <= r.cross_eval_clients <= n_train, "run.cross_eval_clients",
             f"must be 0 (all) or in [2, {n_train}] (the trained clients: a gap needs two), got {r.cross_eval_clients}")
    _require(r.cross_eval_clients == 0 or r.cross_eval, "run.cross_eval_clients",
             "samples the cross-evaluation: set run.cross_eval=true with it (or leave it 0)")
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
    _require(r.num_gpus_per_client >= 0, "run.num_gpus_per_client", f"must be >= 0, got {r.num_gpus_per_client}")
    _require(r.num_gpus_per_client == 0 or r.engine == "flower", "run.num_gpus_per_client",
             "needs run.engine=flower (the fast engine uses run.device)")
    _require(r.ray_address is None or bool(r.ray_address.strip()), "run.ray_address",
             "must be HOST:PORT of a running Ray head, 'auto', or null (start a local Ray)")
    _require(r.ray_address is None or r.engine == "flower", "run.ray_address",
             "needs run.engine=flower (the fast engine runs in this process; sweeps use --ray-address)")
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
    _require(r.device == "cpu" or r.batch_clients or cfg.model.modality == "llm", "run.device",
             "only the batched trainer and the llm modality run off the CPU; set run.batch_clients=true")

    if d.path is not None:
        _require(Path(d.path).is_dir(), "data.path", f"not a directory: {d.path}")

    _require(m.modality in MODALITIES, "model.modality", f"unknown modality {m.modality!r}; allowed: {', '.join(MODALITIES)}")
    _require(m.adapter in ADAPTERS, "model.adapter", f"unknown adapter {m.adapter!r}; allowed: {', '.join(ADAPTERS)}")
    _require(m.modality != "vision" or m.adapter == "prompt", "model.adapter",
             f"{m.adapter!r} needs model.modality=text or llm; vision supports: prompt")
    _require(m.modality != "text" or d.shift.name != "domain", "data.shift.name",
             "domain shift transforms images; with model.modality=text use: none, concept")
    if m.modality == "llm":
        lm = m.llm
        _require(lm.context_tokens >= 8, "model.llm.context_tokens", f"must be >= 8, got {lm.context_tokens}")
        _require(lm.target_tokens >= 1, "model.llm.target_tokens", f"must be >= 1, got {lm.target_tokens}")
        _require(lm.lora_from_layer >= 0, "model.llm.lora_from_layer", f"must be >= 0, got {lm.lora_from_layer}")
        _require(lm.lora_from_layer == 0 or m.adapter == "lora", "model.llm.lora_from_layer",
                 f"restricts LoRA to the top layers: needs model.adapter=lora, not {m.adapter!r}")
        _require(lm.adapter_from_layer >= 0, "model.llm.adapter_from_layer", f"must be >= 0, got {lm.adapter_from_layer}")
        _require(lm.adapter_from_layer == 0 or m.adapter in ("lora", "prompt"), "model.llm.adapter_from_layer",
                 f"needs model.adapter=lora or prompt (a prefix acts in every layer), not {m.adapter!r}")
        _require(lm.adapter_from_layer == 0 or lm.lora_from_layer in (0, lm.adapter_from_layer),
                 "model.llm.lora_from_layer", f"is {lm.lora_from_layer} but model.llm.adapter_from_layer is "
                 f"{lm.adapter_from_layer}; set one of them")
        _require(lm.generations >= 0, "model.llm.generations", f"must be >= 0, got {lm.generations}")
        _require(lm.max_new_tokens >= 1, "model.llm.max_new_tokens", f"must be >= 1, got {lm.max_new_tokens}")
        _require(not r.batch_clients, "run.batch_clients",
                 "the batched trainer is for ViTs and text encoders; with model.modality=llm set it to false")
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
    _require(c.optimizer in OPTIMIZERS, "client.optimizer", f"allowed: {', '.join(OPTIMIZERS)}; got {c.optimizer!r}")
    _require(c.optimizer == "sgd" or not r.batch_clients, "client.optimizer",
             "run.batch_clients trains with its own row-wise SGD; use client.optimizer=sgd with it")
    _require(0 <= c.momentum < 1, "client.momentum", f"must be in [0, 1), got {c.momentum}")
    _require(c.weight_decay >= 0, "client.weight_decay", f"must be >= 0, got {c.weight_decay}")
    _require(c.batch_size >= 1, "client.batch_size", f"must be >= 1, got {c.batch_size}")
    dp = cfg.dp
    _require(dp.clip_norm >= 0, "dp.clip_norm", f"must be >= 0 (0 = DP off), got {dp.clip_norm}")
    _require(dp.noise_multiplier >= 0, "dp.noise_multiplier", f"must be >= 0, got {dp.noise_multiplier}")
    _require(dp.noise_multiplier == 0 or dp.clip_norm > 0, "dp.noise_multiplier",
             "noise needs a clipping bound: set dp.clip_norm > 0")
    _require(0 < dp.delta < 1, "dp.delta", f"must be in (0, 1), got {dp.delta}")


def check_numbers(obj: Any, prefix: str = "") -> None:
    """Every float field anywhere in the config (strategy section included) is finite, and every
    learning rate (``lr``, ``*_lr``) is > 0: inf or NaN would only surface as NaN metrics rounds later."""
    for f in dataclasses.fields(obj):
        v, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            check_numbers(v, name + ".")
        elif isinstance(v, float) or (isinstance(v, list) and any(isinstance(x, float) for x in v)):
            vals = v if isinstance(v, list) else [v]
            _require(all(math.isfinite(x) for x in vals if isinstance(x, float)), name, f"must be finite, got {v}")
        if (f.name == "lr" or f.name.endswith("_lr")) and isinstance(v, (int, float)):
            _require(v > 0, name, f"learning rates must be > 0, got {v}")


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
