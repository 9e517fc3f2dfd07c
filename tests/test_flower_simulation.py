"""The default path: the fedpers ServerApp and ClientApp on Flower's simulation engine."""

import json

import numpy as np
import pytest

from fedpers import simulate
from tests.conftest import assert_same_client_losses, tiny_overrides


def majority_label_accuracy(overrides: list[str]) -> float:
    """Mean over clients of the accuracy of predicting the client's most frequent training label: what a
    model that learned only each client's label skew scores on this partition."""
    import torch

    from fedpers.data import build_federated
    from fedpers.experiment import load_config

    cfg = load_config(None, overrides)
    fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    return float(np.mean([(c.y_test == torch.bincount(c.y_train).argmax()).float().mean().item() for c in fed.clients]))


def test_one_flower_round_computes_what_the_inprocess_engine_computes(tmp_path):
    """The fast tier's Flower run: one round of two clients through Ray and real Flower messages, the same
    per-client losses as the in-process engine."""
    kw = {"run.num_clients": 2, "run.clients_per_round": 2, "run.rounds": 1, "run.num_cpus_per_client": 1}
    for engine in ("flower", "inprocess"):
        assert simulate.main(tiny_overrides(tmp_path / engine, **{**kw, "run.engine": engine})) == 0
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["failures"] == 0
    assert_same_client_losses(tmp_path / "flower", tmp_path / "inprocess")


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flower") / "run"
    overrides = tiny_overrides(out, **{"run.engine": "flower", "run.num_clients": 4, "run.clients_per_round": 4,
                                      "run.rounds": 3, "run.num_cpus_per_client": 2})
    assert simulate.main(overrides) == 0
    return out, overrides


def test_flower_run_learns_and_writes_results(flower_run):
    out, overrides = flower_run
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 3 and summary["failures"] == 0
    assert all(r["num_ok"] == 4 and r["applied"] for r in rows)
    # better than each client's majority label, the baseline its label skew alone gives (not 1/classes)
    assert summary["final"]["accuracy_mean"] > majority_label_accuracy(overrides)
    assert rows[-1]["accuracy_mean"] > rows[0]["accuracy_mean"]


@pytest.mark.parametrize("engine", [["run.engine=inprocess"], ["run.engine=fast", "run.batch_clients=true"]])
def test_flower_and_inprocess_engines_agree(flower_run, tmp_path, engine):
    """Clients are keyed by partition-id, so the transport (and batching clients) does not change what is
    computed. Both runs use the exact caches (run.cache defaults on), in Flower's workers too."""
    out, overrides = flower_run
    inproc = tmp_path / "inproc"
    overrides = [o for o in overrides if not o.startswith(("run.engine=", "run.output_dir="))]
    assert simulate.main(overrides + engine + [f"run.output_dir={inproc}"]) == 0
    assert_same_client_losses(out, inproc)


def test_faulty_clients_in_the_flower_engine(tmp_path, monkeypatch):
    """A client that raises and one that sends NaN, through real Flower messages: the round goes on."""
    monkeypatch.setenv("FEDPERS_FAULTS", "1:raise,2:nan@2")
    out = tmp_path / "faults"
    overrides = tiny_overrides(out, **{"run.engine": "flower", "run.num_cpus_per_client": 2})
    assert simulate.main(overrides) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["num_ok"], r["num_failed"], r["num_timed_out"], r["applied"]) for r in rows] == [
        (2, 1, 0, True), (1, 2, 0, True)]
    assert rows[0]["failures"][0]["partition_id"] == 1 and rows[0]["failures"][0]["kind"] == "error"
    assert "InjectedFault" in rows[0]["failures"][0]["reason"]
    assert {(f["partition_id"], f["kind"], f["code"]) for f in rows[1]["failures"]} == {
        (1, "error", ""), (2, "invalid", "nonfinite")}


def test_text_lora_through_the_flower_engine_matches_the_fast_engine(tmp_path):
    """The text modality (peft LoRA on the packaged MiniLM) through real Flower messages: same numbers."""
    from tests.conftest import text_tiny_overrides

    base = text_tiny_overrides(tmp_path / "unused", "lora", **{"strategy.name": "pfedlora_gen",
                                                              "run.num_cpus_per_client": 2})
    base = [o for o in base if not o.startswith(("run.engine=", "run.output_dir="))]
    runs = {}
    for engine in ("flower", "fast"):
        out = tmp_path / engine
        assert simulate.main(base + [f"run.engine={engine}", f"run.output_dir={out}"]) == 0
        runs[engine] = json.loads((out / "summary.json").read_text())
    assert runs["flower"]["failures"] == 0 and runs["flower"]["rounds"] == 2
    assert_same_client_losses(tmp_path / "flower", tmp_path / "fast")
    assert runs["flower"]["bytes"] == runs["fast"]["bytes"]


def test_llm_through_the_flower_engine_matches_the_fast_engine(tmp_path):
    """The llm modality (LoRA on a tiny random Llama, chitchat speakers) through real Flower messages:
    every client's reply loss per round equals the fast engine's (float tolerance), and the tiny model
    folder reaches Ray's workers by its path."""
    from tests.llm_helpers import llm_tiny_overrides

    base = llm_tiny_overrides(tmp_path / "unused", "lora", **{"strategy.name": "fedit", "run.num_cpus_per_client": 2,
                                                              "client.optimizer": "adamw", "client.lr": 0.01})
    base = [o for o in base if not o.startswith(("run.engine=", "run.output_dir="))]
    runs = {}
    for engine in ("flower", "fast"):
        out = tmp_path / engine
        assert simulate.main(base + [f"run.engine={engine}", f"run.output_dir={out}"]) == 0
        runs[engine] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["flower"]) == len(runs["fast"]) == 2
    for a, b in zip(runs["flower"], runs["fast"]):
        assert a["clients"].keys() == b["clients"].keys() and a["num_failed"] == 0
        for k in a["clients"]:
            for m in ("test_loss", "train_loss"):
                assert abs(a["clients"][k][m] - b["clients"][k][m]) < 1e-4, (k, m, a["clients"][k], b["clients"][k])
