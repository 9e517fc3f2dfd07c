"""The layers read one way: strategies sit above the client blocks, which never look a strategy up by
name; neither the strategy registry nor the client blocks are imported by the modules below them."""

import pkgutil
import subprocess
import sys

import pytest

import fedpers.data
from strategies import get_strategy_class, list_strategies

# Every module of the data layer except its leaf schema (fedpers.data.config), which fedpers.config composes.
DATA_MODULES = sorted(f"fedpers.data.{m.name}" for m in pkgutil.iter_modules(fedpers.data.__path__) if m.name != "config")


def loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module, must_not_load", [
    ("fedpers.client", {"strategies", "fedpers.rounds", "fedpers.server"}),
    ("strategies", {"fedpers.config", "fedpers.client", "fedpers.data"}),
    ("fedpers.config", {"strategies", "fedpers.client", *DATA_MODULES}),
    (", ".join(DATA_MODULES), {"fedpers.config", "strategies", "fedpers.client"}),
])
def test_importing_a_layer_does_not_import_the_layers_above(module, must_not_load):
    assert not loaded_after(module) & must_not_load


@pytest.mark.parametrize("name", list_strategies())
def test_client_reads_what_it_trains_from_the_strategy_config(name):
    cls = get_strategy_class(name)
    cfg = cls.config_cls()
    assert (cfg.deep_prompts, cfg.trains_backbone) == (cls.deep_prompts, cls.trains_backbone)
