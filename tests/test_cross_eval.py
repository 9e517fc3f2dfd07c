"""run.cross_eval: each trained client's personal model scored on every client's test split, through the
run's own transport (the fast engine, and Flower's message path via the real ClientApp)."""

import csv
import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpers.experiment import load_config
from fedpers.rounds.engine import InProcessTransport
from fedpers.rounds.server import run_server
from tests.conftest import tiny_overrides


def run_fast(tmp_path, name, **extra):
    cfg = load_config(None, tiny_overrides(tmp_path / name, **{"strategy.name": name, "run.cross_eval": "true", **extra}))
    summary = run_server(cfg, InProcessTransport(cfg))
    return cfg, summary, read_matrix(tmp_path / name)


def read_matrix(out):
    with (out / "cross_eval.csv").open() as f:
        return {(int(r["model_client"]), int(r["data_client"])): float(r["accuracy"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The purely local run, read (never changed) by two tests: a second identical run would add nothing."""
    tmp_path = tmp_path_factory.mktemp("cross-eval")
    return tmp_path, run_fast(tmp_path, "local")


def test_diagonal_is_each_clients_own_accuracy_and_gap_is_own_minus_others(local_run):
    tmp_path, (cfg, summary, m) = local_run
    n = cfg.run.num_clients
    assert set(m) == {(i, j) for i in range(n) for j in range(n)}
    for pid, acc in summary["final"]["per_client"].items():  # the model scored is the one each client reported
        assert m[(int(pid), int(pid))] == pytest.approx(acc, abs=1e-6)
    ce = summary["final"]["cross_eval"]
    own = np.mean([m[(i, i)] for i in range(n)])
    others = np.mean([np.mean([m[(i, j)] for j in range(n) if j != i]) for i in range(n)])
    assert ce["own_mean"] == pytest.approx(own) and ce["others_mean"] == pytest.approx(others)
    assert ce["gap"] == pytest.approx(own - others) and ce["num_models"] == n
    # purely local models on label-skewed clients are personal: they do better at home
    assert ce["gap"] > 0
    assert (tmp_path / "local" / "cross_eval.png").stat().st_size > 0
    assert json.loads((tmp_path / "local" / "summary.json").read_text())["final"]["cross_eval"]["gap"] == ce["gap"]


@pytest.mark.slow
def test_a_shared_model_scores_the_same_whoever_owns_it(tmp_path, local_run):
    """fedavg clients all evaluate the global model they received, so every row of the matrix is the
    same: a cross-evaluation that scored the data owner's model instead would still pass the diagonal
    test above, not this one. (And its gap is zero only up to each client's own split.)"""
    cfg, _, m = run_fast(tmp_path, "fedavg")
    n = cfg.run.num_clients
    for d in range(n):
        assert len({m[(i, d)] for i in range(n)}) == 1, d
    _, (_, _, local) = local_run
    assert any(len({local[(i, d)] for i in range(n)}) > 1 for d in range(n))


def test_off_by_default_and_state_keeps_only_personal_tensors(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "off", **{"strategy.name": "fedvpt"}))
    t = InProcessTransport(cfg)
    summary = run_server(cfg, t)
    assert "cross_eval" not in summary["final"] and not (tmp_path / "off" / "cross_eval.csv").exists()
    assert all(set(s) == {"head.weight", "head.bias"} for s in t.states.values())


class ClientAppGrid:
    """A Grid whose nodes run fedpers' real ClientApp functions in this process: every cross-evaluation
    message crosses Flower's Message/ArrayRecord/MetricRecord encoding as it does under simulation."""

    def __init__(self, n):
        self.contexts = {100 + p: Context(1, 100 + p, {"partition-id": p}, RecordDict(), {}) for p in range(n)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, msgs, timeout):
        from fedpers.flower.apps import query, train

        out = []
        for m in msgs:
            ctx = self.contexts[m.metadata.dst_node_id]
            out.append(query(m, ctx) if m.metadata.message_type == "query" else train(m, ctx))
        return out


@pytest.mark.slow
def test_flower_transport_gives_the_fast_engines_matrix(tmp_path, monkeypatch):
    from fedpers.flower.apps import FlowerTransport

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    _, _, fast = run_fast(tmp_path, "fedvpt")
    cfg = load_config(None, tiny_overrides(tmp_path / "flower", **{"strategy.name": "fedvpt", "run.cross_eval": "true"}))
    summary = run_server(cfg, FlowerTransport(ClientAppGrid(cfg.run.num_clients), cfg))
    assert summary["final"]["cross_eval"]["failures"] == []
    flower = read_matrix(tmp_path / "flower")
    assert flower.keys() == fast.keys()
    for k in fast:
        assert flower[k] == pytest.approx(fast[k], abs=1e-6), k


def test_sweep_table_has_the_gap_column(tmp_path):
    from fedpers.sweep.cli import write_table

    row = {"partition": "p", "strategy": "s", "seed": 0, "status": "ok", "accuracy_mean": 0.5,
           "accuracy_worst10": 0.2, "unseen_accuracy_mean": None, "params_per_round": 10, "bytes_per_round": 40}
    text = write_table([{**row, "cross_eval_gap": 0.25}, {**row, "seed": 1, "cross_eval_gap": 0.15}],
                       tmp_path / "t.md", "t")
    header = next(line for line in text.splitlines() if line.startswith("| strategy | seeds"))
    line = next(line for line in text.splitlines() if line.startswith("| s | 2"))
    assert line.split(" | ")[header.split(" | ").index("gap")] == "20.0 ± 5.0"


def test_llm_sweep_table_has_the_perplexity_gap(tmp_path):
    from fedpers.sweep.cli import write_table

    row = {"partition": "p", "strategy": "s", "seed": 0, "status": "ok", "accuracy_mean": 0.2,
           "accuracy_worst10": 0.1, "unseen_accuracy_mean": None, "params_per_round": 10, "bytes_per_round": 40,
           "perplexity_mean": 90.0, "perplexity_worst10": 200.0}
    text = write_table([{**row, "cross_eval_perplexity_gap": 30.0}, {**row, "seed": 1, "cross_eval_perplexity_gap": 10.0}],
                       tmp_path / "t.md", "t")
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("## cross-evaluation perplexity gap"))
    assert next(line for line in lines[at:] if line.startswith("| s |")).endswith("| 20.0 ± 10.0 |")
    assert "cross-evaluation perplexity gap" not in write_table([row], tmp_path / "u.md", "t")  # none recorded


def test_a_client_without_a_model_is_a_recorded_failure_not_a_crash(tmp_path):
    """With 2 of 3 clients sampled in the only round, one client never trained: its upload fails with a
    reason, the two trained models are still scored on all three test splits."""
    cfg, summary, m = run_fast(tmp_path, "local", **{"run.rounds": 1, "run.clients_per_round": 2})
    ce = summary["final"]["cross_eval"]
    trained = {int(p) for p in summary["final"]["per_client"]}
    assert len(trained) == 2 and ce["num_models"] == 2
    assert {m_ for m_, _ in m} == trained and {d for _, d in m} == set(range(cfg.run.num_clients))
    (failure,) = ce["failures"]
    assert failure["stage"] == "upload" and failure["partition_id"] not in trained
    assert "no personal model" in failure["reason"]


@pytest.mark.slow
def test_a_sampled_cross_evaluation_is_the_full_matrix_restricted_to_the_sample(tmp_path, local_run):
    """run.cross_eval_clients=N: N trained clients' models on those N clients' splits only, with the very
    values the full matrix has there (drawing the sample moves neither training nor the round sampling),
    and the gap computed from that N x N block."""
    _, (cfg, full_summary, full) = local_run
    n = 2
    assert cfg.run.num_clients > n
    _, summary, m = run_fast(tmp_path, "local", **{"run.cross_eval_clients": str(n)})
    picked = sorted({i for i, _ in m})
    assert len(picked) == n and set(m) == {(i, j) for i in picked for j in picked}
    assert summary["final"]["per_client"] == full_summary["final"]["per_client"]
    for k, acc in m.items():
        assert acc == pytest.approx(full[k], abs=1e-6), k
    ce = summary["final"]["cross_eval"]
    own = np.mean([m[(i, i)] for i in picked])
    others = np.mean([np.mean([m[(i, j)] for j in picked if j != i]) for i in picked])
    assert ce["num_models"] == n and ce["gap"] == pytest.approx(own - others, abs=1e-5)  # csv: 6 decimals
    again = run_fast(tmp_path / "again", "local", **{"run.cross_eval_clients": str(n)})[2]
    assert sorted({i for i, _ in again}) == picked  # drawn by run.seed


@pytest.mark.parametrize("extra,needle", [({"run.cross_eval_clients": "1"}, "[2, "),
                                          ({"run.cross_eval_clients": "99"}, "[2, "),
                                          ({"run.cross_eval": "false", "run.cross_eval_clients": "2"}, "run.cross_eval=true")])
def test_bad_cross_eval_clients_is_refused_naming_the_field(tmp_path, extra, needle):
    from fedpers.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, tiny_overrides(tmp_path, **{"strategy.name": "local", "run.cross_eval": "true", **extra}))
    assert "run.cross_eval_clients" in str(e.value) and needle in str(e.value)
