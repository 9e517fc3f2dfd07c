"""The benchmark grid driver on the smoke grid: cells, files, table, resume."""

import csv
from pathlib import Path

import pytest

from fedpers.config import ConfigError
from fedpers.sweep import cli as sweep

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments/configs/benchmark_smoke.yaml"


def test_smoke_grid_writes_results_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    # --jobs 1: the cells run in this process. Worker processes (each importing torch and timm anew) are
    # test_sweep_jobs.py's subject; this test is about files, table and resume, which do not depend on them.
    assert sweep.main([str(SMOKE), "--output-dir", str(out), "--no-progress", "--jobs", "1"]) == 0
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["strategy"], r["status"]) for r in rows] == [("fedvpt", "ok"), ("pfedpg_fast", "ok")]
    for r in rows:
        assert 0 <= float(r["accuracy_mean"]) <= 1 and 0 <= float(r["unseen_accuracy_mean"]) <= 1
        assert int(r["params_per_round"]) == 2 * 10 * 128  # prompts down, delta up
        assert (Path(r["output_dir"]) / "summary.json").is_file()
    table = (out / "table.md").read_text()
    assert "| fedvpt | 1 |" in table and "| pfedpg_fast | 1 |" in table and "## dir1.0" in table
    pivot = table.split("## worst-10% by partition setting")[0].split("## accuracy by partition setting (%)")[1]
    acc = {r["strategy"]: f"{100 * float(r['accuracy_mean']):.1f} ± 0.0" for r in rows}
    assert all(f"| {s} | " in pivot and acc[s] in pivot for s in acc), pivot
    assert (out / "plots/accuracy_by_strategy.png").is_file() and (out / "plots/accuracy_vs_bytes.png").is_file()

    # Resume: finished cells are not run again.
    from fedpers import simulate

    def boom(cfg, **_):
        raise AssertionError("a finished cell was re-run")

    monkeypatch.setattr(simulate, "run", boom)
    # A config saved before a field existed (here: run.workers) counts as having its default.
    saved = Path(rows[0]["output_dir"]) / "config.yaml"
    text = saved.read_text()
    assert "  workers: 1\n" in text
    saved.write_text(text.replace("  workers: 1\n", ""))
    assert sweep.main([str(SMOKE), "--output-dir", str(out), "--no-progress"]) == 0
    assert list(csv.DictReader((out / "runs.csv").open())) == rows
    # --report-only runs nothing and lists what is not finished.
    assert sweep.main([str(SMOKE), "--output-dir", str(out), "--no-progress", "--report-only", "--seeds", "0,7"]) == 1
    report = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["strategy"], r["seed"], r["status"]) for r in report] == [
        ("fedvpt", "0", "ok"), ("fedvpt", "7", "missing"), ("pfedpg_fast", "0", "ok"), ("pfedpg_fast", "7", "missing")]
    assert "Failed or missing cells" in (out / "table.md").read_text()
    # A changed config re-runs its cells (and a failing cell is recorded, not fatal).
    assert sweep.main([str(SMOKE), "--output-dir", str(out), "--no-progress", "--strategies", "fedvpt",
                       "client.lr=0.01"]) == 1
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert rows[0]["status"] == "failed" and "re-run" in rows[0]["error"]


def test_benchmark_grid_is_valid(tmp_path):
    _, cells = sweep.load_grid(ROOT / "experiments/configs/benchmark.yaml", output_dir=str(tmp_path))
    from strategies import get_strategy_class, list_strategies

    labels = {c.strategy for c in cells}
    vision = {n for n in list_strategies() if "vision" in get_strategy_class(n).modalities}
    assert labels >= vision  # every registered vision strategy, plus tuned variants
    assert len(cells) == len(labels) * 5 * 3  # 5 partition settings, 3 seeds
    assert all(c.cfg.run.engine == "inprocess" and c.cfg.run.holdout_clients == 2 for c in cells)
    assert {c.cfg.data.partitioner.alpha for c in cells if c.partition.startswith("dir")} == {0.1, 0.5}


def test_bad_grid_names_the_field(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("strategies: [fedavg]\npartitions: {p: {data.partitioner.alpha: -1}}\n")
    with pytest.raises(ConfigError, match="data.partitioner.alpha"):
        sweep.load_grid(bad)
    bad.write_text("strategies: [fedavg]\npartitions: {p: {}}\nseed: [1]\n")
    with pytest.raises(ConfigError, match="grid.seed"):
        sweep.load_grid(bad)
    bad.write_text("strategies: [fedavg, local]\npartitions: {p: {}}\nreference: fedit\n")
    with pytest.raises(ConfigError, match="grid.reference.*fedavg, local"):
        sweep.load_grid(bad)
    assert sweep.main([str(bad), "--dry-run"]) == 2
    bad.write_text("strategies: [fedavg, local]\npartitions: {p: {}}\nreference: local\n")
    assert sweep.load_grid(bad)[1] and sweep.grid_reference(bad) == "local"


def test_nest_merges_dotted_and_nested_keys():
    assert sweep.nest({"run.rounds": 2, "run": {"seed": 1}, "data": {"partitioner.alpha": 0.5}}) == {
        "run": {"rounds": 2, "seed": 1}, "data": {"partitioner": {"alpha": 0.5}}}


@pytest.mark.parametrize("content, says", [
    (b"strategies: [fedavg\n", "YAML syntax error at"), (b"\xf3\x81\x00\xff binary", "is not a text file"),
    (b"42\n", "not a int"), (b"- fedavg\n", "not a list")])
def test_malformed_binary_or_scalar_grid_exits_2_naming_the_file(tmp_path, capsys, content, says):
    grid = tmp_path / "g.yaml"
    grid.write_bytes(content)
    with pytest.raises(ConfigError, match="grid"):
        sweep.load_grid(grid)
    assert sweep.main([str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert says in err and str(grid) in err and "Traceback" not in err
