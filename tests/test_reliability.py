"""Nothing lost, nothing executed, no single client takes a run down: checkpoints that run no code,
results folders that are never overwritten silently, a server state that stays finite, and user
errors refused with exit code 2 before any work."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpers import simulate
from fedpers.experiment import load_config
from fedpers.payload import Reply
from fedpers.results import checkpoint
from fedpers.rounds.faults import FaultyTransport
from fedpers.rounds.server import build_strategy, run_server
from fedpers.safety import RunFailed, check_outcome
from tests.conftest import tiny_overrides

METRICS = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.5, "num_test": 4.0}


class WritesAFile:
    """Unpickling this calls ``Path(target).write_text(...)``: what a hostile checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "code ran while loading"))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": checkpoint.FORMAT_VERSION, "round": 1, "config": {}, "payload": WritesAFile(marker)}, path)


def test_crafted_pickle_checkpoint_runs_no_code_and_exits_2(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned.txt"
    plant(out / checkpoint.FILENAME, marker)
    # The file really is hostile: the general unpickler runs its code (so this test can fail).
    probe = tmp_path / "probe.pt"
    plant(probe, tmp_path / "probe-ran.txt")
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran.txt").exists()

    assert simulate.main(tiny_overrides(out, **{"run.resume": "true"})) == 2
    assert not marker.exists()
    assert "loaded safely" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({"format": 1, "round": 1})])
def test_unreadable_or_foreign_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / checkpoint.FILENAME
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.read_checkpoint(path)


def test_encoded_state_round_trips_arrays_scalars_and_rng_states(tmp_path):
    import random

    state = {
        "clients": {3: {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)},
                    7: {"x": np.array([1, 2], dtype=">i8"), "s": np.float64(2.5)}},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "rows": [{"round": 1, "accuracy_mean": float("nan"), "applied": True, "failures": []}],
    }
    path = tmp_path / "c.pt"
    torch.save(checkpoint.encode(state), path)
    back = checkpoint.decode(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(back["clients"][3]["head.weight"], state["clients"][3]["head.weight"])
    assert back["clients"][7]["x"].dtype == np.dtype(">i8") and back["clients"][7]["s"] == 2.5
    assert isinstance(back["clients"][7]["s"], np.float64)
    assert back["rng"]["python"] == state["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["rng"]["numpy"][0] == "MT19937"
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    with pytest.raises(TypeError, match="cannot store"):
        checkpoint.encode({"bad": object()})


def _files(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in ("metrics.jsonl", "checkpoint.pt", "summary.json")}


def test_existing_results_folder_is_refused_kept_and_replaced_only_on_request(tmp_path, capsys):
    out = tmp_path / "run"
    assert simulate.main(tiny_overrides(out)) == 0
    before = _files(out)
    capsys.readouterr()
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1})) == 2
    err = capsys.readouterr().err
    assert "run.resume=true" in err and "run.overwrite=true" in err
    assert _files(out) == before  # nothing cut, nothing rewritten
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1, "run.overwrite": "true"})) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert checkpoint.read_checkpoint(out / checkpoint.FILENAME)["round"] == 1


def test_results_folder_is_resolved_before_it_is_claimed(tmp_path):
    from fedpers.config import ConfigError
    from fedpers.results.run_folder import check

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (tmp_path / "link").symlink_to(out)
    for spelled in (out / "x" / "..", tmp_path / "link"):
        with pytest.raises(ConfigError, match=f"{out} already holds a run"):
            check(load_config(None, tiny_overrides(spelled)))
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no stray "x", nothing written


def test_resume_of_a_moved_results_folder(tmp_path):
    first = tmp_path / "first"
    assert simulate.main(tiny_overrides(first, **{"run.rounds": 1})) == 0
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    assert simulate.main(tiny_overrides(moved, **{"run.resume": "true"})) == 0
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["rounds"] == summary["rounds_applied"] == 2


def test_output_dir_that_is_a_file_and_absurd_memory_exit_2_before_any_work(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert simulate.main(tiny_overrides(f)) == 2
    assert "run.output_dir" in capsys.readouterr().err
    assert simulate.main(tiny_overrides(tmp_path / "big", **{"model.num_prompts": 2_000_000})) == 2
    assert "run.max_memory_gb" in capsys.readouterr().err
    assert not (tmp_path / "big" / "partitions").exists()  # refused before the data was built


@pytest.mark.parametrize("text, where", [("run:\n  rounds: [1\n", ":3:"), ("- 1\n- 2\n", "mapping"),
                                         ("run: 3\n", "run")])
def test_yaml_syntax_and_shape_errors_name_the_file(tmp_path, capsys, text, where):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert simulate.main(["--config", str(path), "--show-config"]) == 2
    err = capsys.readouterr().err
    assert where in err and str(path) in err


@pytest.mark.parametrize("override, field", [
    ("run.seed=-1", "run.seed"), ("client.lr=inf", "client.lr"), ("client.lr=nan", "client.lr"),
    ("strategy.server_lr=inf", "strategy.server_lr"), ("run.max_delta_norm=nan", "run.max_delta_norm"),
    ("data.test_fraction=nan", "data.test_fraction")])
def test_non_finite_or_out_of_range_numbers_exit_2(tmp_path, capsys, override, field):
    assert simulate.main([*tiny_overrides(tmp_path / "o"), override, "--show-config"]) == 2
    assert f"'{field}'" in capsys.readouterr().err


class Stub:
    """Training-free clients: a small delta toward a per-client target; ``poison`` maps pid -> delta value."""

    def __init__(self, poison=None, examples=None):
        self.poison, self.examples = poison or {}, examples or {}

    def exchange(self, server_round, payloads, timeout):
        out = {}
        for pid, arrays in payloads.items():
            deltas = {f"delta/{k}": np.full_like(v, self.poison.get(pid, 0.01 * (pid + 1)), dtype=np.float32)
                      for k, v in arrays.items()}
            out[pid] = Reply(pid, deltas, self.examples.get(pid, 10), dict(METRICS))
        return out


def fedavg_cfg(tmp_path, **kw):
    return load_config(None, tiny_overrides(tmp_path / "out", **{
        "strategy.name": "fedavg", "run.num_clients": 3, "run.clients_per_round": 3, "run.rounds": 1, **kw}))


def rows(cfg):
    return [json.loads(x) for x in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_finite_but_absurd_delta_is_rejected_by_the_norm_bound(tmp_path):
    cfg = fedavg_cfg(tmp_path)
    strategy = build_strategy(cfg)
    summary = run_server(cfg, Stub(poison={1: 3e38}), strategy)
    (row,) = rows(cfg)
    assert [(f["partition_id"], f["code"]) for f in row["failures"]] == [(1, "norm")]
    assert row["applied"] and summary["rounds_applied"] == 1
    for v in strategy.state_dict()["global"].values():
        assert np.isfinite(v).all()


def test_aggregate_that_overflows_is_rolled_back_naming_the_client(tmp_path):
    # With the norm bound lifted, 3e38 passes validation; server_lr=4 takes the aggregate past float32.
    cfg = fedavg_cfg(tmp_path, **{"run.max_delta_norm": 1e300, "strategy.server_lr": 4.0, "run.rounds": 2})
    strategy = build_strategy(cfg)
    before = strategy.state_dict()
    summary = run_server(cfg, Stub(poison={1: 3e38}, examples={1: 1000}), strategy)
    r1, _ = rows(cfg)
    assert not r1["applied"] and r1["rejected"] == {"reason": "nonfinite_state", "partition_ids": [1]}
    assert summary["rolled_back_rounds"] == [1, 2] and summary["rounds_applied"] == 0
    for k, v in strategy.state_dict()["global"].items():
        np.testing.assert_array_equal(v, before["global"][k])  # rolled back bit for bit
    with pytest.raises(RunFailed, match="no round was applied"):
        check_outcome(summary)


def test_claimed_num_examples_is_capped(tmp_path):
    # Client 2 claims 10M examples; capped at 10 it weighs as much as the others (10 each).
    cfg = fedavg_cfg(tmp_path, **{"run.max_num_examples": 10})
    strategy = build_strategy(cfg)
    g0 = strategy.state_dict()["global"]
    run_server(cfg, Stub(examples={2: 10_000_000}), strategy)
    expected = np.mean([0.01 * (p + 1) for p in range(3)])
    for k, v in strategy.state_dict()["global"].items():
        np.testing.assert_allclose(v - g0[k], expected, rtol=1e-5)


def test_run_with_no_applied_round_exits_non_zero(tmp_path, monkeypatch, capsys):
    import fedpers.rounds.engine

    real = fedpers.rounds.engine.InProcessTransport

    class AllRaise(FaultyTransport):
        def __init__(self, cfg):
            super().__init__(real(cfg), {(p, None): "raise" for p in range(3)})

        def close(self):
            self.inner.close()

    monkeypatch.setattr(fedpers.rounds.engine, "InProcessTransport", AllRaise)
    out = tmp_path / "dead"
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1})) == 1
    assert "no round was applied" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["rounds_applied"] == 0


def test_non_finite_final_metrics_fail_the_run():
    with pytest.raises(RunFailed, match="accuracy_mean"):
        check_outcome({"rounds_applied": 2, "final": {"accuracy_mean": float("nan"), "accuracy_std": 0.0,
                                                      "accuracy_worst10": 0.1}})
    check_outcome({"rounds_applied": 1, "final": {"accuracy_mean": 0.5, "accuracy_std": 0.0, "accuracy_worst10": 0.5}})


def test_oversize_drill_exceeds_the_default_upload_limit():
    """The drill must reach the size check with the default run.max_upload_mb, not fail on shape first."""
    from fedpers.config import RunConfig
    from fedpers.payload import validate_reply
    from fedpers.rounds.faults import corrupt

    spec = {"delta/prompts": (10, 192)}
    good = Reply(0, {"delta/prompts": np.zeros((10, 192), np.float32)}, 10, dict(METRICS))
    max_bytes = int(RunConfig().max_upload_mb * 1024 * 1024)
    assert validate_reply(good, spec, max_bytes) is None
    assert validate_reply(corrupt(good, "oversize"), spec, max_bytes).code == "size"
