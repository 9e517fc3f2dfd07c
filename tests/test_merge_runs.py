"""experiments/merge_runs.py: a re-run's rows replace exactly the cells they re-ran."""

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("merge_runs", ROOT / "experiments/merge_runs.py")
merge_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge_runs)

HEAD = "partition,strategy,seed,status,accuracy_mean,accuracy_worst10,unseen_accuracy_mean,params_per_round,bytes_per_round,rounds,wall_time_s,output_dir,error\n"


def test_later_rows_replace_the_same_cell_and_new_cells_are_appended(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text(HEAD + "d,a,0,ok,0.5,0.1,0.4,10,40,20,1,x,\nd,b,0,ok,0.61,0.2,0.5,10,40,20,1,x,\n")
    new.write_text(HEAD + "d,b,0,ok,0.9,0.3,0.7,10,40,20,1,y,\nd,c,0,ok,0.7,0.3,0.6,10,40,20,1,y,\n")
    assert merge_runs.main([str(old), str(new), "--out", str(tmp_path / "m"), "--title", "t"]) == 0
    rows = list(csv.DictReader((tmp_path / "m/runs.csv").open()))
    assert [(r["strategy"], float(r["accuracy_mean"]), r["output_dir"]) for r in rows] == [
        ("a", 0.5, "x"), ("b", 0.9, "y"), ("c", 0.7, "y")]
    table = (tmp_path / "m/table.md").read_text()
    assert "| b | 40 | 90.0 ± 0.0 |" in table and "61.0" not in table  # the replaced value is gone
