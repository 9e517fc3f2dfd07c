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
