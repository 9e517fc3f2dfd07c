"""``python -m fedpers.bench --quick`` runs and writes every key (a smoke run, never a timing test)."""

import json

import pytest

from fedpers.bench import core as bench


@pytest.mark.slow  # about 3 minutes on 2 cores
def test_quick_bench_writes_every_part(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--output", str(out), "--only", "P1,P2,P3,P4,P5,P6,P7,P8,profile"]) == 0
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


@pytest.mark.slow  # ~25 CPU s: two short LLM runs and a memory child on the tiny Llama
def test_llm_part_reports_consistent_figures(tmp_path):
    """P9 on a tiny Llama: each reported ratio is the quotient of the reported times and counts, and the
    memory child holds one LoRA state per speaker of the model's own shapes."""
    import math

    from fedpers.client import client_setup
    from fedpers.data import build_federated
    from fedpers.experiment import load_config
    from tests.llm_helpers import tiny_llm_folder

    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--only", "P9", "--llm-backbone", tiny_llm_folder(), "--output", str(out)]) == 0
    p9 = json.loads(out.read_text())["P9_llm"]
    assert p9["ratio_vs_bare"] == p9["engine_round_s"] / (p9["bare_train_fwd_bwd_s"] + p9["bare_test_fwd_s"])
    assert p9["train_tokens_per_s_bare"] == p9["train_tokens"] / p9["bare_train_fwd_bwd_s"]
    lf = p9["lora_from_layer"]
    assert lf["speedup"] == lf["all_layers_s_per_example"] / lf["top_half_s_per_example"]
    cfg = load_config(None, [*p9["config"], f"run.output_dir={tmp_path / 'x'}"])
    model = client_setup(cfg).model
    fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    tokens = sum(int(model.prepare(c.x_train).lengths.sum()) for c in fed.clients)
    assert p9["train_tokens"] == tokens * cfg.client.local_epochs  # every client's every row, once per epoch
    mem = p9["memory"]
    per_state = sum(4 * math.prod(s) for s in model.tensor_shapes().values()) / 2**20
    assert mem["states_held"] == mem["speakers"] == 8 and abs(mem["lora_state_mb_per_speaker"] - per_state) < 1e-12
    assert mem["peak_rss_mb"] >= mem["rss_with_states_mb"] >= mem["rss_with_model_mb"] > mem["rss_start_mb"]
