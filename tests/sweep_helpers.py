"""Cell functions for the sweep executor tests. They live in an importable module (not a test file)
because spawned worker processes import them by name."""

import os

from fedpers.sweep.local import run_cell


def crash_or_run(cfg_yaml: str) -> tuple[str, str]:
    """Kills its worker process (as the OOM killer would) for cells of the strategy labelled ``crash``;
    runs every other cell for real."""
    if "/crash/" in cfg_yaml:
        os._exit(9)
    return run_cell(cfg_yaml)
