"""A run never loses results: a refused or failed start leaves the results folder as it was (an
overwritten run comes back, a created folder goes), a finished run is never rewritten by a resume, and
two runs never write into one folder at once."""

import os
import socket
from pathlib import Path

import pytest

from fedpers import simulate
from fedpers.data import DataError
from fedpers.experiment import load_config
from fedpers.results import run_folder
from tests.conftest import tiny_overrides
from tests.test_reliability import Stub


@pytest.fixture
def stub_clients(monkeypatch):
    """Training-free clients in the in-process engine: the runs here test the folder, not the training."""
    monkeypatch.setattr(
        "fedpers.rounds.engine.InProcessTransport.exchange",
        lambda self, server_round, payloads, timeout: Stub().exchange(server_round, payloads, timeout),
    )


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (the lock file aside) with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != run_folder.LOCK_NAME
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".replaced-" in p.name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-round run (training-free clients); tests copy it, never change it."""
    from fedpers.rounds.server import run_server

    out = tmp_path_factory.mktemp("finished") / "run"
    run_server(load_config(None, tiny_overrides(out, **{"run.rounds": 1})), Stub())
    return out


def copy_of(finished: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(finished, dest)
    return dest


def test_a_refused_overwrite_keeps_the_old_run_untouched(tmp_path, finished, capsys):
    out = copy_of(finished, tmp_path / "run")
    before = snapshot(out)
    code = simulate.main(
        tiny_overrides(out, **{"run.rounds": 1, "run.overwrite": "true", "model.num_prompts": 2_000_000})
    )
    assert code == 2 and "run.max_memory_gb" in capsys.readouterr().err
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["preflight", "round 1"])
def test_an_overwrite_that_fails_before_its_first_round_puts_the_old_run_back(tmp_path, finished, monkeypatch, stage):
    """The old run is moved aside while the new one starts, and moved back when it fails."""
    out = copy_of(finished, tmp_path / "run")
    before = snapshot(out)
    seen = {}

    def fail(*args, **kwargs):
        seen["files"] = sorted(os.listdir(out))  # the old run really was out of the way at this point
        raise DataError(f"injected failure at {stage}")

    if stage == "preflight":
        monkeypatch.setattr(simulate, "preflight", fail)
    else:
        monkeypatch.setattr("fedpers.rounds.engine.InProcessTransport.exchange", fail)
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1, "run.overwrite": "true"})) == 2
    assert "summary.json" not in seen["files"]
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_replacing_run_deletes_the_old_one_only_after_its_first_round(tmp_path, finished, monkeypatch, stub_clients):
    out = copy_of(finished, tmp_path / "run")
    (out / "old-only.txt").write_text("a file of the old run")
    from fedpers.results import checkpoint

    aside_during_round_1 = []
    real = checkpoint.save_checkpoint

    def spy(cfg, server_round, *a, **k):
        aside_during_round_1.append((server_round, leftovers(tmp_path)))
        return real(cfg, server_round, *a, **k)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 2, "run.overwrite": "true"})) == 0
    (r1, aside1), (r2, aside2) = aside_during_round_1
    assert (r1, r2) == (1, 2) and len(aside1) == 1 and aside2 == []
    assert not (out / "old-only.txt").exists() and leftovers(tmp_path) == []
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_refused_or_failed_run_leaves_no_folder_it_created(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a" / "b" / "run"
    assert simulate.main(tiny_overrides(out, **{"model.num_prompts": 2_000_000})) == 2
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(simulate, "preflight", lambda cfg: (_ for _ in ()).throw(DataError("injected")))
    assert simulate.main(tiny_overrides(out)) == 2
    assert not (tmp_path / "a").exists()
    # A folder that was there stays, with the user's files and nothing of the failed run.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert simulate.main(tiny_overrides(mine)) == 2
    assert sorted(os.listdir(mine)) == ["notes.txt"]


def test_resuming_a_finished_run_changes_nothing_and_says_so(tmp_path, finished, capsys):
    out = copy_of(finished, tmp_path / "run")
    before = snapshot(out)
    capsys.readouterr()
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1, "run.resume": "true"})) == 0
    captured = capsys.readouterr()
    assert "finished run" in captured.err and "larger run.rounds" in captured.err
    assert str(out) in captured.out  # the stored result is printed as after a run
    assert snapshot(out) == before


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys, stub_clients):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(out))
    with run_folder.claim(cfg):
        assert simulate.main(tiny_overrides(out)) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in err and "run.output_dir" in err
        assert simulate.main(tiny_overrides(out, **{"run.overwrite": "true"})) == 2  # overwrite does not break a lock
    assert not (out / "metrics.jsonl").exists()
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1})) == 0  # released when the holder ended


def _bare_tensor(path: Path) -> None:
    import torch

    torch.save(torch.zeros(3), path)


def _other_model(path: Path) -> None:
    import torch

    torch.save({"state_dict": {"module.head.weight": torch.zeros(10, 4)}}, path)


@pytest.mark.parametrize(
    "name, write, problem",
    [
        ("w.safetensors", lambda p: p.write_bytes(os.urandom(256)), "not a safetensors file"),
        ("w.npz", lambda p: p.write_bytes(os.urandom(256)), "not a .npz archive"),
        ("w.npy", lambda p: p.write_bytes(os.urandom(256)), "holds one array"),
        ("w.pt", _bare_tensor, "holds a Tensor, not a mapping"),
        ("w.pt", _other_model, "names vit_fedpers_digits does not have (e.g. head.weight)"),
    ],
)
def test_an_unusable_weights_file_exits_2_naming_it_before_any_work(tmp_path, capsys, name, write, problem):
    weights = tmp_path / name
    write(weights)
    out = tmp_path / "run"
    assert simulate.main(tiny_overrides(out, **{"model.checkpoint": str(weights)})) == 2
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and str(weights) in err and problem in err
    assert "Traceback" not in err and not out.exists()  # refused before the folder, the data and the backbone


def _state_numel(state) -> int:
    """Numbers in a strategy ``state_dict``: float tensors and arrays of at least one dimension."""
    import numpy as np
    import torch

    if isinstance(state, dict):
        return sum(_state_numel(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_numel(v) for v in state)
    if isinstance(state, np.ndarray) and state.ndim and np.issubdtype(state.dtype, np.inexact):
        return state.size
    if isinstance(state, torch.Tensor) and state.ndim and state.is_floating_point():
        return state.numel()
    return 0


def _cases():
    from strategies import get_strategy_class, list_strategies

    cases = []
    for name in list_strategies():
        cls = get_strategy_class(name)
        cases += [(name, "vision", {})] if "vision" in cls.modalities else []
        cases += [(name, "lora", {})] if "text" in cls.modalities and "lora" in cls.adapters else []
    # the optimizer's state depends on its kind: Adam 2 moments, SGD with momentum 1, plain SGD none
    cases += [
        ("pfedhn", "vision", {"strategy.server_optimizer": "sgd", "strategy.server_momentum": 0.9}),
        ("pfedpg", "vision", {"strategy.server_optimizer": "sgd", "strategy.basis_size": 7}),
    ]
    return cases


@pytest.mark.parametrize(
    "name, adapter, extra",
    _cases(),
    ids=lambda c: c if isinstance(c, str) else ",".join(f"{k[9:]}={v}" for k, v in c.items()),
)
def test_declared_server_state_size_is_what_the_strategy_holds(tmp_path, name, adapter, extra):
    """Declared from shapes (before anything is allocated) = the numbers in its state_dict once every
    client has replied, so the memory check sees generators, bases, folds and optimizer moments."""
    import numpy as np

    from fedpers.experiment import build
    from strategies import ClientUpdate, get_strategy_class
    from tests.conftest import text_tiny_overrides

    over = {"strategy.name": name, **extra}
    cfg = load_config(
        None,
        tiny_overrides(tmp_path, **over) if adapter == "vision" else text_tiny_overrides(tmp_path, adapter, **over),
    )
    cls, n = get_strategy_class(name), cfg.run.num_clients
    declared = cls.server_state_numel(cfg.strategy, num_clients=n, shapes=build(cfg).shapes)
    s = build(cfg).new_strategy()
    pids = list(range(n))
    s.configure(1, pids)
    metrics = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.5, "num_test": 4.0, "local_steps": 1.0}
    s.aggregate(
        1,
        [
            ClientUpdate(p, {k[6:]: np.full(v, 0.01, np.float32) for k, v in s.reply_spec(p).items()}, 10, metrics)
            for p in pids
        ],
    )
    assert declared == _state_numel(s.state_dict())
    assert s.broadcast == cls.broadcast_shapes(cfg.strategy, num_clients=n, shapes=s.shapes)
    if hasattr(s, "generator"):
        got = {k: tuple(p.shape) for k, p in s.generator.named_parameters()}
        assert cls.generator_shapes(cfg.strategy, num_clients=n, shapes=s.shapes) == got


@pytest.mark.parametrize(
    "name, field, value", [("pfedpg", "strategy.basis_size", 100_000_000), ("pfedhn", "strategy.hidden_dim", 100_000)]
)
def test_a_huge_strategy_tensor_is_refused_before_it_is_allocated(tmp_path, capsys, name, field, value):
    from fedpers.safety import memory_lower_bound_bytes
    from strategies import get_strategy_class

    small, big = (
        load_config(None, tiny_overrides(tmp_path / "o", **{"strategy.name": name, **kw}))
        for kw in ({}, {field: value})
    )
    # the estimate grows by exactly the declared server state (4 bytes a number): nothing else changed
    cls, shapes, n = get_strategy_class(name), build_shapes(small), small.run.num_clients
    grown = cls.server_state_numel(big.strategy, num_clients=n, shapes=shapes) - cls.server_state_numel(
        small.strategy, num_clients=n, shapes=shapes
    )
    assert memory_lower_bound_bytes(big) - memory_lower_bound_bytes(small) == 4 * grown > 40 * 2**30
    assert simulate.main(tiny_overrides(tmp_path / "o", **{"strategy.name": name, field: value})) == 2
    assert "run.max_memory_gb" in capsys.readouterr().err and not (tmp_path / "o").exists()


def build_shapes(cfg):
    from fedpers.experiment import build

    return build(cfg).shapes


class Silent(Stub):
    """Training-free clients of which ``silent`` never answer."""

    def __init__(self, silent):
        super().__init__()
        self.silent = set(silent)

    def exchange(self, server_round, payloads, timeout):
        return {p: r for p, r in super().exchange(server_round, payloads, timeout).items() if p not in self.silent}


def test_final_accuracy_says_which_clients_it_covers(tmp_path):
    """A client with no accepted reply has no personal model to score: the means leave it out and the
    summary says so (count and ids), instead of silently averaging fewer clients."""
    from fedpers.rounds.server import run_server

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "o", **{"run.num_clients": 4, "run.clients_per_round": 4, "run.rounds": 1, "run.min_replies": 1}
        ),
    )
    final = run_server(cfg, Silent({1, 3}))["final"]
    assert final["num_clients_evaluated"] == 2 and final["clients_never_evaluated"] == [1, 3]
    assert sorted(final["per_client"]) == ["0", "2"]
    full = run_server(load_config(None, tiny_overrides(tmp_path / "p", **{"run.rounds": 1})), Stub())["final"]
    assert full["num_clients_evaluated"] == 3 and full["clients_never_evaluated"] == []
