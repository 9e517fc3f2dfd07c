"""Small validation helpers shared by strategy configs (errors name the ``strategy.*`` field)."""

from __future__ import annotations

from fedpers.errors import ConfigError


def require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"strategy.{field_name}", message)


def require_choice(value: str, field_name: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, field_name, f"unknown value {value!r}; allowed: {', '.join(allowed)}")
