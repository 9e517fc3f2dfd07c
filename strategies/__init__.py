"""Personalization strategies, registered by name. Importing this package registers the built-ins."""

from strategies.base import (
    HEAD,
    ClientUpdate,
    Strategy,
    StrategyConfig,
    create_strategy,
    get_config_cls,
    get_strategy_class,
    list_strategies,
    register_strategy,
)
from strategies import (  # noqa: E402,F401  (registration side effects)
    apfl,
    ditto,
    fedavg,
    fedavg_ft,
    fedavg_full,
    feddpa,
    fedex_lora,
    fedper,
    fedprox,
    fedrep,
    fedvpt,
    fedvpt_deep,
    flora,
    hetlora,
    local,
    llm_references,
    lora_baselines,
    pfedhn,
    pfedlora_gen,
    pfedmoap,
    pfedpg,
)

__all__ = [
    "HEAD",
    "ClientUpdate",
    "Strategy",
    "StrategyConfig",
    "create_strategy",
    "get_config_cls",
    "get_strategy_class",
    "list_strategies",
    "register_strategy",
]
