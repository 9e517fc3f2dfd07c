"""Checkpoint/resume: an interrupted run, resumed, ends bit-identical to one that never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpers import simulate
from fedpers.experiment import load_config
from fedpers.results.checkpoint import FILENAME, CheckpointError, load_checkpoint, read_checkpoint
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import run_server
from tests.conftest import tiny_overrides

ROUNDS = 4
# Timing fields are the only ones allowed to differ between an interrupted and an uninterrupted run.
TIMING = ("round_time_s", "wall_time_s")


class Crash(RuntimeError):
    pass


class CrashingTransport(InProcessTransport):
    """Dies at the start of round ``crash_round``, like a killed server would."""

    def __init__(self, cfg, crash_round):
        super().__init__(cfg)
        self.crash_round = crash_round

    def exchange(self, server_round, payloads, timeout):
        if server_round == self.crash_round:
            raise Crash(f"injected crash in round {server_round}")
        return super().exchange(server_round, payloads, timeout)


def overrides(out, **kw):
    # 4 clients, 3 sampled per round: exercises the sampling schedule across the resume point.
    return tiny_overrides(out, **{"run.rounds": ROUNDS, "run.num_clients": 4, "run.clients_per_round": 3, **kw})


def final_state(out: Path):
    ckpt = read_checkpoint(out / FILENAME)
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k != "wall_time_s"}
    return ckpt, rows, summary


def assert_bit_identical(a, b, rounds=ROUNDS):
    (ca, ra, sa), (cb, rb, sb) = a, b
    assert ca["round"] == cb["round"] == rounds
    assert ca["strategy"]["generator"].keys() == cb["strategy"]["generator"].keys()
    for k, v in ca["strategy"]["generator"].items():
        assert torch.equal(v, cb["strategy"]["generator"][k]), k
    oa, ob = ca["strategy"]["optimizer"], cb["strategy"]["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys() and oa["state"], (oa["state"].keys(), ob["state"].keys())
    for i, x in oa["state"].items():
        assert x.keys() == ob["state"][i].keys(), i
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(ob["state"][i][key])), (i, key)
    assert ca["clients"].keys() == cb["clients"].keys()
    for pid in ca["clients"]:
        for k, v in ca["clients"][pid].items():
            np.testing.assert_array_equal(v, cb["clients"][pid][k])
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    assert ra == rb
    assert sa == sb


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "full"
    assert simulate.main(overrides(out)) == 0
    return final_state(out)


def test_stop_after_round_1_then_resume_equals_the_uninterrupted_run(tmp_path):
    """The fast tier's resume: a 2-round tiny run, and the same run stopped after round 1 and resumed (the
    checkpoint, metrics.jsonl and summary.json agree bit for bit)."""
    kw = {"run.rounds": 2, "run.num_clients": 10, "run.clients_per_round": 2}  # ~135 images a client
    assert simulate.main(tiny_overrides(tmp_path / "full", **kw)) == 0
    cut = tmp_path / "cut"
    assert simulate.main(tiny_overrides(cut, **{**kw, "run.rounds": 1})) == 0
    assert read_checkpoint(cut / FILENAME)["round"] == 1
    assert simulate.main(tiny_overrides(cut, **{**kw, "run.resume": "true"})) == 0
    assert_bit_identical(final_state(cut), final_state(tmp_path / "full"), rounds=2)


def test_crash_after_round_2_then_resume_is_bit_identical(tmp_path, uninterrupted):
    out = tmp_path / "crashed"
    cfg = load_config(None, overrides(out))
    with pytest.raises(Crash):
        run_server(cfg, CrashingTransport(cfg, crash_round=3))
    assert read_checkpoint(out / FILENAME)["round"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert simulate.main(overrides(out, **{"run.resume": "true"})) == 0
    assert_bit_identical(final_state(out), uninterrupted)


def test_killed_subprocess_resumes_bit_identical(tmp_path, uninterrupted):
    """SIGKILL the real CLI as soon as a checkpoint exists, then resume it."""
    out = tmp_path / "killed"
    # Same thread count as this process (which computes the reference): CPU kernels may sum in a
    # different order with another number of threads, and this check is bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "fedpers.simulate", *overrides(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / FILENAME).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done = read_checkpoint(out / FILENAME)["round"]
    if done >= ROUNDS:
        pytest.skip("the run finished before it could be killed (machine too fast for this check)")
    assert simulate.main(overrides(out, **{"run.resume": "true"})) == 0
    assert_bit_identical(final_state(out), uninterrupted)


def test_resume_can_extend_the_number_of_rounds(tmp_path, uninterrupted):
    out = tmp_path / "extend"
    assert simulate.main(overrides(out, **{"run.rounds": 2})) == 0
    assert simulate.main(overrides(out, **{"run.resume": "true"})) == 0
    assert_bit_identical(final_state(out), uninterrupted)


def test_resume_refuses_another_experiment_and_a_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "other"
    assert simulate.main(overrides(out, **{"run.rounds": 1})) == 0
    with pytest.raises(CheckpointError, match="client.lr"):
        load_config_and_check(out, **{"client.lr": 0.5})
    assert simulate.main(overrides(tmp_path / "nothing", **{"run.resume": "true"})) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_config_field_existed_resumes_at_its_default(tmp_path):
    """A field added to fedpers after a checkpoint was written reads as its default there (as a finished
    sweep cell's config.yaml is read), so upgrading fedpers does not orphan a stopped run; a field the
    checkpoint does record still has to match."""
    out = tmp_path / "older"
    assert simulate.main(overrides(out, **{"run.rounds": 1})) == 0
    raw = torch.load(out / FILENAME, map_location="cpu", weights_only=True)
    assert raw["config"]["run"].pop("cross_eval_clients") == 0  # as written before the field existed
    torch.save(raw, out / FILENAME)
    assert load_config_and_check(out)["round"] == 1
    with pytest.raises(CheckpointError, match="run.cross_eval_clients"):
        load_config_and_check(out, **{"run.cross_eval": "true", "run.cross_eval_clients": 2})


def load_config_and_check(out, **kw):
    return load_checkpoint(load_config(None, overrides(out, **{"run.resume": "true", **kw})))


class StubAll:
    """A training-free client for any strategy: a deterministic delta for every tensor it receives."""

    def __init__(self, crash_round=None):
        self.crash_round = crash_round

    def exchange(self, server_round, payloads, timeout):
        from fedpers.payload import Reply

        if server_round == self.crash_round:
            raise Crash(server_round)
        metrics = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.5, "num_test": 4.0}
        return {pid: Reply(pid, {f"delta/{k}": (0.1 * np.sin(v + pid + server_round)).astype(np.float32)
                                 for k, v in arrays.items()}, 10 + pid, metrics)
                for pid, arrays in payloads.items()}


def assert_tree_equal(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, path


@pytest.mark.parametrize("name", __import__("strategies").list_strategies())
def test_every_strategy_resumes_bit_identical(tmp_path, name):
    """Conformance: a strategy's state_dict must hold everything its future updates depend on."""
    from fedpers.rounds.server import build_strategy
    from strategies import get_strategy_class
    from tests.conftest import text_tiny_overrides

    modalities = get_strategy_class(name).modalities
    text_only = "vision" not in modalities

    def cfg_for(out, **kw):
        kw = {"strategy.name": name, **kw}
        if modalities == ("llm",):  # LLM references: the tiny chitchat federation on a tiny Llama
            from tests.llm_helpers import llm_tiny_overrides

            return load_config(None, llm_tiny_overrides(out, "lora", **{
                "run.rounds": ROUNDS, "run.num_clients": 4, "run.clients_per_round": 3, **kw}))
        if text_only:  # LoRA strategies: the tiny text federation, same schedule
            return load_config(None, text_tiny_overrides(out, "lora", **{
                "run.rounds": ROUNDS, "run.num_clients": 4, "run.clients_per_round": 3, **kw}))
        return load_config(None, overrides(out, **kw))

    full_cfg = cfg_for(tmp_path / "full")
    full = build_strategy(full_cfg)
    run_server(full_cfg, StubAll(), full)

    cfg = cfg_for(tmp_path / "cut")
    with pytest.raises(Crash):
        run_server(cfg, StubAll(crash_round=3), build_strategy(cfg))
    resumed_cfg = cfg_for(tmp_path / "cut", **{"run.resume": "true"})
    resumed = build_strategy(resumed_cfg)
    run_server(resumed_cfg, StubAll(), resumed)
    assert_tree_equal(resumed.state_dict(), full.state_dict())
