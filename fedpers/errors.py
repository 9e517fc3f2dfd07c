"""Errors every layer may raise, kept in a module that imports nothing from fedpers, so that the
registries (strategies, datasets) can name a bad config field without importing ``fedpers.config``,
which composes them."""


class ConfigError(ValueError):
    """A config field has a bad value. ``field`` is the dotted key."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"config field '{field_name}': {message}")


class DataError(ValueError):
    """The data cannot support the configured federation (e.g. a client with no test samples)."""
