"""``python -m fedpers.bench --quick`` runs and writes every key (a smoke run, never a timing test)."""

import json

import pytest

from fedpers.bench import core as bench


@pytest.mark.slow  # about 3 minutes on 2 cores
def test_quick_bench_writes_every_part(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("P1_overhead", "P2_vs_flower", "P3_batched", "P4_memory", "P5_bytes", "P6_cache", "P7_sweep",
                "P8_busy", "profile"):
        assert key in result, key
    assert result["P1_overhead"]["ratio_vs_train_fwd_bwd"] > 0
    assert 0 < result["P5_bytes"]["ratio"] < 0.01  # prompts, not a ViT, cross the network
    assert result["P6_cache"]["head_only"]["speedup_warm"] > 0
    p7 = result["P7_sweep"]  # both sweeps ran their cells and finished (a failed sweep raises)
    assert p7["ratio"] > 0 and p7["jobs"] >= 2 and set(p7["cells_per_hour"]) == {"jobs_1", f"jobs_{p7['jobs']}"}
    p8 = result["P8_busy"]
    assert set(p8["round_times"]) == {f"{p}_{load}_s" for p in ("auto", "one_thread") for load in ("idle", "busy")}
    assert p8["auto"] == round(p8["round_times"]["auto_busy_s"] / p8["round_times"]["auto_idle_s"], 2)
    assert result["machine"]["load_average_at_start"] and result["load_average_at_end"]
    assert json.loads(capsys.readouterr().out) == result
