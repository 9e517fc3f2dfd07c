"""``python -m fedpers.bench --quick`` runs and writes every key (a smoke run, never a timing test)."""

import json
import statistics
from pathlib import Path

import pytest

from fedpers.bench import core as bench


@pytest.mark.slow  # about 3 minutes on 2 cores
def test_quick_bench_writes_every_part(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--output", str(out), "--only", "P1,P2,P3,P4,P5,P6,P7,P8,profile"]) == 0
    result = json.loads(out.read_text())
    for key in (
        "P1_overhead",
        "P2_vs_flower",
        "P3_batched",
        "P4_memory",
        "P5_bytes",
        "P6_cache",
        "P7_sweep",
        "P8_busy",
        "profile",
    ):
        assert key in result, key
    # every ratio is the quotient of the two measured quantities the same part reports
    p1 = result["P1_overhead"]
    assert p1["ratio_vs_train_fwd_bwd"] == p1["fast_round_s"] / p1["bare_train_fwd_bwd_s"]
    assert p1["ratio_vs_train_fwd_bwd_plus_test_fwd"] == p1["fast_round_s"] / p1["bare_with_test_fwd_s"]
    assert p1["bare_with_test_fwd_s"] > p1["bare_train_fwd_bwd_s"]  # the test forward adds time
    p5 = result["P5_bytes"]
    assert p5["ratio"] == p5["bytes_per_client_round"] / p5["full_model_fedavg_bytes"]
    assert p5["ratio"] < 0.01  # prompts, not a ViT, cross the network
    for kind in ("shallow_prompts_joint", "head_only", "prompts_from_layer_L"):
        p6 = result["P6_cache"][kind]
        assert p6["speedup_warm"] == p6["uncached_s"][1] / p6["cached_s"][1], kind
        assert p6["speedup_first_pass"] == p6["uncached_s"][0] / p6["cached_s"][0], kind
    p3 = result["P3_batched"]["quick"]
    assert p3["speedup"] == statistics.median(p3["sequential_round_s"]) / statistics.median(p3["batched_round_s"])
    p7 = result["P7_sweep"]  # both sweeps ran their cells and finished (a failed sweep raises)
    par = p7["wall_s"][f"jobs_{p7['jobs']}"]
    seq = sum(p7["wall_s"]["jobs_1"]) / 2
    assert p7["ratio"] == pytest.approx(seq / par, rel=1e-12) and p7["jobs"] >= 2
    assert p7["cells_per_hour"] == pytest.approx(
        {"jobs_1": 3600 * p7["cells"] / seq, f"jobs_{p7['jobs']}": 3600 * p7["cells"] / par}, rel=1e-12
    )
    p8 = result["P8_busy"]
    times = p8["round_times"]
    assert set(times) == {f"{p}_{load}_s" for p in ("auto", "one_thread") for load in ("idle", "busy")}
    for key, (num, den) in {
        "auto": ("auto_busy_s", "auto_idle_s"),
        "one_thread": ("one_thread_busy_s", "one_thread_idle_s"),
        "busy_auto_vs_one_thread": ("auto_busy_s", "one_thread_busy_s"),
    }.items():
        assert abs(p8[key] - times[num] / times[den]) <= 0.005 + 1e-12, (key, p8[key], times)  # 2 decimals
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
    for adapter in ("lora", "prompt"):
        lf = p9["adapter_from_layer"][adapter]
        assert lf["speedup"] == {L: lf["all_layers_s_per_example"] / t for L, t in lf["from_layer_s_per_example"].items()}
    cfg = load_config(None, [*p9["config"], f"run.output_dir={tmp_path / 'x'}"])
    model = client_setup(cfg).model
    fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    tokens = sum(int(model.prepare(c.x_train).lengths.sum()) for c in fed.clients)
    assert p9["train_tokens"] == tokens * cfg.client.local_epochs  # every client's every row, once per epoch
    mem = p9["memory"]
    per_state = sum(4 * math.prod(s) for s in model.tensor_shapes().values()) / 2**20
    assert mem["states_held"] == mem["speakers"] == 8 and abs(mem["lora_state_mb_per_speaker"] - per_state) < 1e-12
    assert mem["peak_rss_mb"] >= mem["rss_with_states_mb"] >= mem["rss_with_model_mb"] > mem["rss_start_mb"]


def test_ratios_are_the_quotients_of_injected_timings(monkeypatch, tmp_path):
    """P1 and P8 on known round and loop times (nothing trains): P1 divides the median round-2 time by the
    median bare loop, P8 the median of rounds 2.. with a busy neighbour by the same without one."""
    rounds = iter(
        [
            [{"round_time_s": 99.0, "sampled": [0]}, {"round_time_s": 3.0, "sampled": [0, 1]}],
            [{"round_time_s": 99.0, "sampled": [0]}, {"round_time_s": 5.0, "sampled": [0, 1]}],
        ]
    )
    loops = iter([{"train_fwd_bwd_s": 1.0, "with_test_fwd_s": 1.6}, {"train_fwd_bwd_s": 3.0, "with_test_fwd_s": 3.4}])
    monkeypatch.setattr(bench, "fast_rounds", lambda overrides, out, n: next(rounds))
    monkeypatch.setattr(bench, "cfg_of", lambda overrides, out: None)
    monkeypatch.setattr(bench, "bare_loop", lambda cfg, pids: next(loops))
    p1 = bench.p1_overhead(False, tmp_path)
    assert (p1["fast_round_s"], p1["bare_train_fwd_bwd_s"], p1["bare_with_test_fwd_s"]) == (4.0, 2.0, 2.5)
    assert p1["ratio_vs_train_fwd_bwd"] == 2.0 and p1["ratio_vs_train_fwd_bwd_plus_test_fwd"] == 1.6

    # round 1 (first of each list) pays the caches' fill and is left out of the median
    times = {
        "auto_idle": [50.0, 2.0, 2.0],
        "auto_busy": [50.0, 5.0, 4.0],
        "one_thread_idle": [50.0, 3.0, 3.0],
        "one_thread_busy": [50.0, 3.0, 4.0],
    }
    monkeypatch.setattr(bench, "fast_round_times", lambda overrides, out, n: times[Path(out).name])
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    p8 = bench.p8_busy(True, tmp_path)
    assert p8["round_times"] == {
        "auto_idle_s": 2.0,
        "auto_busy_s": 4.5,
        "one_thread_idle_s": 3.0,
        "one_thread_busy_s": 3.5,
    }
    assert (p8["auto"], p8["one_thread"], p8["busy_auto_vs_one_thread"]) == (2.25, 1.17, 1.29)
