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
    ("fedpers.client", {"strategies", "fedpers.rounds.client_round", "fedpers.rounds.server"}),
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


# ---- The whole package's import graph, read with ast (tests/import_graph.py) --------------------------
# Floors, lowest first. A module may import modules of its own floor or of floors below it, never above;
# and no set of modules imports itself round a loop. The README's architecture section draws the same order.
FLOORS = [
    ("base", ["fedpers", "fedpers.errors", "fedpers.payload", "fedpers.config", "fedpers.data.config",
              "fedpers.results.plotting"]),  # plotting: colour and style conventions, imports nothing of ours
    ("data", ["fedpers.data"]),
    ("models", ["fedpers.models"]),
    ("client", ["fedpers.client", "fedpers.dp"]),
    ("strategies", ["strategies"]),
    ("experiment", ["fedpers.experiment", "fedpers.docs"]),
    ("results", ["fedpers.results"]),
    ("rounds", ["fedpers.rounds"]),
    ("checks", ["fedpers.safety"]),
    ("flower", ["fedpers.flower"]),
    ("commands", ["fedpers.simulate", "fedpers.partitions", "fedpers.export_partitions"]),
    ("tools", ["fedpers.sweep", "fedpers.bench", "fedpers.gpu_check"]),
]


def floor_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is on no floor: add it to FLOORS (and to the README's diagram)"
    return best[0]


def test_no_import_loops_anywhere():
    from tests.import_graph import cycles, graph

    assert cycles(graph()) == []


def test_imports_never_go_up_a_floor():
    from tests.import_graph import graph

    up = [f"{a} ({FLOORS[floor_of(a)][0]}) imports {b} ({FLOORS[floor_of(b)][0]})"
          for a, deps in sorted(graph().items()) for b in sorted(deps) if floor_of(b) > floor_of(a)]
    assert up == []


def test_the_graph_reader_sees_imports_inside_functions_and_lazy_exports(tmp_path, monkeypatch):
    """The reader is the test's instrument: it must see a function-level import and resolve a name a
    package re-exports lazily to the module that defines it, or the two tests above prove nothing."""
    from tests import import_graph

    g = import_graph.graph()
    assert "fedpers.experiment" in g["fedpers.simulate"]  # a top-level import
    assert "fedpers.data.partition" in g["fedpers.client"]  # `from fedpers.data import build_federated` (lazy)
    assert "strategies" in g["fedpers.experiment"] or "strategies.base" in g["fedpers.experiment"]  # inside a function
    looped = dict(g, **{"fedpers.config": g["fedpers.config"] | {"fedpers.experiment"}})
    assert import_graph.cycles(looped)  # a planted back-edge is a loop


def test_the_experiment_is_built_once_and_both_sides_read_the_same_shapes():
    """The server sizes its strategy and every client sizes its tensors from one computation."""
    from fedpers.client import make_context
    from fedpers.experiment import build, load_config

    cfg = load_config(None, ["run.num_clients=3", "run.clients_per_round=3", "strategy.name=pfedpg"])
    exp = build(cfg)
    assert build(cfg) is exp
    assert make_context(cfg, 1, 1).shapes is exp.client_setup().shapes
    assert exp.client_setup().shapes == exp.shapes == exp.new_strategy().shapes
    assert exp.new_strategy() is not exp.new_strategy()  # a fresh strategy each time: no shared server state
