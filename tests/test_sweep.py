"""The benchmark grid driver on the smoke grid: cells, files, table, resume."""

import csv
import json
from pathlib import Path

import numpy as np
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
        # runs.csv carries each cell's summary: the mean over its trained clients and over its held-out ones
        s = json.loads((Path(r["output_dir"]) / "summary.json").read_text())
        assert float(r["accuracy_mean"]) == pytest.approx(np.mean(list(s["final"]["per_client"].values())))
        assert float(r["unseen_accuracy_mean"]) == pytest.approx(np.mean(list(s["unseen"]["per_client"].values())))
        assert int(r["params_per_round"]) == 2 * 10 * 128  # prompts down, delta up
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
    # A changed config is refused; with --rerun-changed it re-runs its cells (a failing cell is recorded, not fatal).
    changed = [str(SMOKE), "--output-dir", str(out), "--no-progress", "--strategies", "fedvpt", "client.lr=0.01"]
    assert sweep.main(changed) == 2
    assert sweep.main([*changed, "--rerun-changed"]) == 1
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
    # a select group's label may be the reference (its rows are the validation-chosen variant's)
    bad.write_text("strategies: [local, {a: {strategy.name: fedavg}}, {b: {strategy.name: fedvpt}}]\n"
                   "partitions: {p: {}}\nselect: {g: [a, b]}\nreference: [local, g]\n")
    assert sweep.load_grid(bad)[1] and sweep.grid_reference(bad) == ["local", "g"]
    bad.write_text("strategies: [local, {a: {strategy.name: fedavg}}, {b: {strategy.name: fedvpt}}]\n"
                   "partitions: {p: {}}\nselect: {g: [a, b]}\nreference: h\n")
    with pytest.raises(ConfigError, match="grid.reference.*local, a, b, g"):
        sweep.load_grid(bad)


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


def fake_cells(monkeypatch):
    """simulate.run replaced by a writer of config.yaml and a summary (its rounds = run.rounds), plots
    skipped: these tests are about which cells run and which rows runs.csv keeps."""
    import json

    from fedpers import simulate
    from fedpers.config import to_yaml
    from fedpers.sweep import stats

    ran = []

    def run(cfg, overwrite=False, **_):
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        one = {"down_per_client_round": 1, "up_per_client_round": 1}
        (out / "summary.json").write_text(json.dumps({
            "final": {"accuracy_mean": 0.1 * cfg.run.rounds, "accuracy_worst10": 0.0, "per_client": {"0": 0.5}},
            "params": one, "bytes": one, "rounds": cfg.run.rounds, "wall_time_s": 1.0}))
        ran.append(out.relative_to(out.parents[2]).as_posix())

    monkeypatch.setattr(simulate, "run", run)
    monkeypatch.setattr(sweep, "plot", lambda *a, **k: None)
    monkeypatch.setattr(stats, "plot", lambda *a, **k: None)
    return ran


def runs(out):
    return {(r["strategy"], r["seed"]): (r["status"], r["rounds"]) for r in csv.DictReader((out / "runs.csv").open())}


@pytest.mark.slow
def test_a_cell_stopped_after_a_round_continues_from_its_checkpoint(tmp_path, monkeypatch, caplog):
    """A sweep stopped mid-cell (a session's end, a killed worker) loses no finished round: run again, the
    cell continues from its checkpoint, and ends with the figures of a cell that never stopped."""
    from fedpers.results import checkpoint

    grid = ["--no-progress", "--jobs", "1", "--strategies", "fedvpt", "run.rounds=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert sweep.main([str(SMOKE), "--output-dir", str(whole), *grid]) == 0
    real, saved = checkpoint.save_checkpoint, []

    def record(cfg, server_round, *a, **k):
        real(cfg, server_round, *a, **k)
        saved.append(server_round)

    def stop_in_round_2(cfg, server_round, *a, **k):
        if server_round == 2:  # as a session's end stops it: in round 2, after round 1's checkpoint stood
            raise KeyboardInterrupt("stopped")
        record(cfg, server_round, *a, **k)

    monkeypatch.setattr(checkpoint, "save_checkpoint", stop_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([str(SMOKE), "--output-dir", str(cut), *grid])
    cell = next(cut.rglob("checkpoint.pt")).parent
    assert saved == [1] and not (cell / "summary.json").exists()
    saved.clear()
    monkeypatch.setattr(checkpoint, "save_checkpoint", record)
    with caplog.at_level("WARNING", logger="fedpers"):
        assert sweep.main([str(SMOKE), "--output-dir", str(cut), *grid]) == 0
    assert saved == [2] and "continues from its checkpoint" in caplog.text  # round 1 not trained again
    a = json.loads(next(whole.rglob("summary.json")).read_text())["final"]
    b = json.loads((cell / "summary.json").read_text())["final"]
    assert b["per_client"] == pytest.approx(a["per_client"], abs=1e-6)
    assert {r["strategy"]: r["status"] for r in csv.DictReader((cut / "runs.csv").open())}["fedvpt"] == "ok"
    # the cell counts as finished with the grid's config although it was resumed
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *a, **k: pytest.fail("a finished cell ran"))
    assert sweep.main([str(SMOKE), "--output-dir", str(cut), *grid]) == 0


def test_a_moved_grid_folder_keeps_its_finished_cells(tmp_path, monkeypatch):
    """Where a grid's folder lives is not part of a cell's experiment: moved (e.g. from results/ into a
    folder that is committed), its cells still count as finished with the grid's config, nothing re-runs;
    any other field still tells them apart."""
    import shutil

    ran = fake_cells(monkeypatch)
    first, moved = tmp_path / "grid", tmp_path / "elsewhere" / "grid"
    args = ["--no-progress", "--jobs", "1", "--seeds", "0", "run.rounds=2"]
    assert sweep.main([str(SMOKE), "--output-dir", str(first), *args]) == 0
    moved.parent.mkdir()
    shutil.move(first, moved)
    ran.clear()
    assert sweep.main([str(SMOKE), "--output-dir", str(moved), *args]) == 0
    assert ran == [] and set(runs(moved).values()) == {("ok", "2")}
    assert sweep.main([str(SMOKE), "--output-dir", str(moved), "--report-only", *args[:-1], "run.rounds=3"]) == 1
    rows = list(csv.DictReader((moved / "runs.csv").open()))
    assert {r["status"] for r in rows} == {"other_config"}
    assert all(r["error"].endswith("run.rounds: 2 -> 3") for r in rows)  # the folder is not named a change


def test_a_changed_finished_cell_is_refused_and_runs_csv_keeps_every_finished_cell(tmp_path, monkeypatch, capsys):
    ran = fake_cells(monkeypatch)
    out = tmp_path / "grid"
    grid = [str(SMOKE), "--output-dir", str(out), "--no-progress", "--jobs", "1", "run.rounds=2"]
    assert sweep.main([*grid, "--seeds", "0,1"]) == 0
    full = runs(out)
    assert full == {(s, k): ("ok", "2") for s in ("fedvpt", "pfedpg_fast") for k in "01"}
    # One cell again with another run.rounds: refused before anything runs, naming the cell and the field.
    ran.clear()
    capsys.readouterr()
    again = [str(SMOKE), "--output-dir", str(out), "--no-progress", "--jobs", "1", "--strategies", "fedvpt",
             "--seeds", "0", "run.rounds=1"]
    assert sweep.main(again) == 2
    err = capsys.readouterr().err
    assert "dir1.0/fedvpt/seed0: run.rounds: 2 -> 1" in err and "--output-dir" in err and "--rerun-changed" in err
    assert ran == [] and runs(out) == full
    # A subset with the same config runs nothing new and runs.csv still lists the whole grid.
    assert sweep.main([*grid, "--strategies", "fedvpt", "--seeds", "1"]) == 0
    assert ran == [] and runs(out) == full
    # Asked to replace it: only that cell runs; the others stay listed, with the config they ran.
    assert sweep.main([*again, "--rerun-changed"]) == 0
    assert ran == ["dir1.0/fedvpt/seed0"]
    # The 2-round cells are "other_config" for this invocation's config: listed, figures kept, not averaged.
    assert runs(out) == {**{k: ("other_config", "2") for k in full}, ("fedvpt", "0"): ("ok", "1")}
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["strategy"] for r in rows] == ["fedvpt", "fedvpt", "pfedpg_fast", "pfedpg_fast"]
    assert all("run.rounds: 2 -> 1" in r["error"] and r["accuracy_mean"] for r in rows[1:])
    assert "| fedvpt | 1 |" in (out / "table.md").read_text()  # one seed averaged: the one of this config
    # --report-only with the grid's 2 rounds: fedvpt/seed0 (now 1 round) is the cell of another config.
    assert sweep.main([*grid, "--report-only", "--seeds", "0,1"]) == 1
    report = {(r["strategy"], r["seed"]): r for r in csv.DictReader((out / "runs.csv").open())}
    assert report["fedvpt", "0"]["status"] == "other_config" and "run.rounds: 1 -> 2" in report["fedvpt", "0"]["error"]
    assert report["fedvpt", "0"]["accuracy_mean"] and report["fedvpt", "1"]["status"] == "ok"
