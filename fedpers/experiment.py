"""A run's configuration, loaded and checked against the registries: the floor above the strategy,
dataset and backbone registries and below everything that runs an experiment.

:mod:`fedpers.config` owns the schema and the checks of its own fields and imports no registry. The
loaders here (:func:`load_config`, :func:`from_yaml`, :func:`from_layers`) add what needs one: the
``strategy`` section resolved against the chosen strategy's own dataclass, and the cross-section
checks (is the dataset registered, does the strategy run on this modality and adapter, does the dataset
fit the model). Every caller that turns user input into a config uses them.

:func:`build` then turns a validated config into what a run needs, once: the client tensors' shapes
(which size the server's strategy and every client alike), the training and held-out clients, and on
demand the federation's data, the frozen backbone and a fresh strategy. ``simulate``, the sweep's cells
(through it), the Flower apps, the benchmark and the GPU check all start from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedpers.config import (
    ConfigError,
    ExperimentConfig,
    RunConfig,
    _require,
    check_fields,
    merge_layers,
    read_layers,
    resolve_section,
)


def strategy_config(raw: Any) -> Any:
    """The ``strategy`` section as the chosen strategy's own config dataclass."""
    from strategies import get_strategy_class, list_strategies

    raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    name = raw.get("name", "pfedpg")
    if not isinstance(name, str):  # a list or mapping here would be an unhashable-type traceback
        raise ConfigError("strategy.name", f"must be a strategy name; allowed: {', '.join(list_strategies())}")
    try:
        cls = get_strategy_class(name)
    except KeyError:
        hint = [n for n in list_strategies() if n == name.lower().replace("-", "_")]
        hint = f" (did you mean {hint[0]!r}? names are lower case)" if hint else ""
        raise ConfigError("strategy.name", f"unknown strategy {name!r}{hint}; allowed: {', '.join(list_strategies())}") from None
    return resolve_section(cls.config_cls, raw, "strategy")


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file + dotlist overrides -> validated ExperimentConfig. Raises ConfigError."""
    return from_layers(read_layers(config_file, overrides))


def from_layers(layers: list[Any]) -> ExperimentConfig:
    """Merge layers (dicts/DictConfigs) onto the schema, resolve the strategy section and validate."""
    cfg, strategy_raw = merge_layers(layers)
    cfg.strategy = strategy_config(strategy_raw)
    if cfg.model.adapter == "auto":
        cfg.model.adapter = auto_adapter(cfg)
    validate(cfg)
    return cfg


def auto_adapter(cfg: ExperimentConfig) -> str:
    """``model.adapter=auto``: the strategy's first declared adapter (prompts for pFedPG, FedAvg of prompts
    and local training; LoRA for the LoRA methods), so one config serves every strategy; vision: prompt.
    The resolved adapter is what the run's config.yaml records."""
    from strategies import get_strategy_class

    if cfg.model.modality == "vision":
        return "prompt"
    return get_strategy_class(cfg.strategy.name).adapters[0]


def from_yaml(text: str) -> ExperimentConfig:
    return from_layers([OmegaConf.create(text)])


def validate(cfg: ExperimentConfig) -> None:
    """The config's own checks, then those across sections that need the registries."""
    from fedpers.data.catalog import get_dataset_info, list_datasets
    from fedpers.data.schemes import validate_data
    from strategies import get_strategy_class

    check_fields(cfg)
    d, m = cfg.data, cfg.model
    datasets = list_datasets()
    _require(d.dataset in datasets, "data.dataset", f"unknown dataset {d.dataset!r}; allowed: {', '.join(datasets)}")
    validate_data(cfg)
    data_modality = get_dataset_info(d.dataset).modality
    _require(data_modality == m.modality, "model.modality",
             f"{m.modality!r} does not match dataset {d.dataset!r}, which is {data_modality}")
    scls = get_strategy_class(cfg.strategy.name)
    _require(m.modality in scls.modalities, "model.modality",
             f"strategy {scls.name!r} supports {', '.join(scls.modalities)}, not {m.modality!r}")
    _require(m.adapter in scls.adapters, "model.adapter",
             f"strategy {scls.name!r} supports adapters {', '.join(scls.adapters)}, not {m.adapter!r}: "
             f"set model.adapter={scls.adapters[0]} (or auto)")
    validate_strategy = getattr(cfg.strategy, "validate", None)
    if validate_strategy is not None:
        validate_strategy()
    validate_against = getattr(cfg.strategy, "validate_with", None)  # checks that need the rest of the config
    if validate_against is not None:
        validate_against(cfg)


@dataclass(frozen=True)
class Experiment:
    """A validated config and what a run derives from it, computed in one place."""

    cfg: ExperimentConfig
    shapes: dict[str, tuple[int, ...]]  # every client tensor by name (fedpers.client.run_tensor_shapes)
    num_classes: int
    train_ids: tuple[int, ...]  # clients that train
    holdout_ids: tuple[int, ...]  # unseen clients (run.holdout_clients), personalized after training

    def data(self):
        """The federation (every client's train and test split); cached per process."""
        from fedpers.data import build_federated

        c = self.cfg
        return build_federated(c.data, c.run.num_clients, c.run.seed)

    def client_setup(self):
        """The frozen backbone and what every client shares (:func:`fedpers.client.client_setup`)."""
        from fedpers.client import client_setup

        return client_setup(self.cfg)

    def new_strategy(self):
        """A fresh server-side strategy sized from :attr:`shapes`."""
        from fedpers.client import backbone_tensors
        from strategies import create_strategy, get_strategy_class

        c = self.cfg
        extra = {}
        if get_strategy_class(c.strategy.name).trains_backbone:  # the server starts from the pretrained weights
            extra["backbone_state"] = {k: v.numpy() for k, v in backbone_tensors(c).items()}
        return create_strategy(c.strategy, num_clients=c.run.num_clients, shapes=self.shapes, seed=c.run.seed,
                               init_std=c.model.prompt_init_std, **extra)


def build(cfg: ExperimentConfig) -> Experiment:
    """``cfg`` (validated) -> its :class:`Experiment`; one per process and config."""
    from fedpers.config import to_yaml

    from fedpers.client import run_tensor_shapes
    from fedpers.data.catalog import get_dataset_info

    key = to_yaml(cfg)
    hit = _BUILT.get(key)
    if hit is None:
        train, held = split_clients(cfg.run)
        hit = Experiment(cfg, run_tensor_shapes(cfg), get_dataset_info(cfg.data.dataset).num_classes,
                         tuple(train), tuple(held))
        if len(_BUILT) >= 8:  # a sweep in one process walks through its cells; keep the last few
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = hit
    return hit


_BUILT: dict[str, Experiment] = {}


def split_clients(r: RunConfig) -> tuple[list[int], list[int]]:
    """(training, held-out) partition ids; the held-out ones are a seeded draw, so every strategy and
    engine holds out the same clients for a given seed."""
    import numpy as np

    from fedpers.config import holdout_count

    n_hold = holdout_count(r)
    if n_hold == 0:
        return list(range(r.num_clients)), []
    rng = np.random.default_rng([r.seed, 0x401D])
    held = sorted(int(i) for i in rng.choice(r.num_clients, size=n_hold, replace=False))
    return [i for i in range(r.num_clients) if i not in held], held
