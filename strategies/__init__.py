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
from strategies import fedvpt, hetlora, local, lora_baselines, pfedlora_gen, pfedpg  # noqa: E402,F401  (registration side effects)

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
