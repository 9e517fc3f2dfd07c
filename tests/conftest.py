"""Test environment: offline hub, no Flower telemetry, HOME/FLWR_HOME in a temp dir."""

import os
import tempfile

_home = tempfile.mkdtemp(prefix="fedpers-test-home-")
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_HOME": os.path.join(_home, ".flwr"),
    "HOME": _home,
    "MPLBACKEND": "Agg",
})
# A fixed torch thread count (torch's own default: one per core) instead of the auto policy, which
# follows the machine's load: with another count torch's CPU kernels may sum in another order, and
# tests compare runs bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


import pytest


def tiny_overrides(out_dir, **extra) -> list[str]:
    """A small, fast federation on the default data and backbone (dotlist overrides)."""
    base = {
        "run.num_clients": 3,
        "run.clients_per_round": 3,
        "run.rounds": 2,
        "run.engine": "inprocess",
        "run.progress": "false",
        "run.output_dir": str(out_dir),
        "data.partitioner.alpha": 1.0,
        "client.local_epochs": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_cfg(tmp_path):
    from fedpers.experiment import load_config

    def make(**extra):
        return load_config(None, tiny_overrides(tmp_path / "out", **extra))

    return make


def text_tiny_overrides(out_dir, adapter: str = "lora", **extra) -> list[str]:
    """The tiny federation on the small synthetic text set and the packaged MiniLM (short sequences)."""
    text = {
        "model.modality": "text",
        "model.backbone": "all-MiniLM-L6-v2",
        "model.adapter": adapter,
        "model.max_length": 16,
        "model.num_prompts": 4,
        "data.dataset": "synthetic_text_small",
        "data.partitioner.name": "iid",
    }
    text.update(extra)
    return tiny_overrides(out_dir, **text)


def assert_same_client_losses(out_a, out_b, rel: float = 1e-4) -> None:
    """Two runs' metrics.jsonl agree round by round: the same clients, and each client's test and train loss
    within ``rel`` (relative). Accuracy is a count of a few test images; the losses move with every weight."""
    import json
    from pathlib import Path

    runs = [[json.loads(line) for line in (Path(o) / "metrics.jsonl").read_text().splitlines()] for o in (out_a, out_b)]
    assert len(runs[0]) == len(runs[1]) > 0, [len(r) for r in runs]
    for a, b in zip(*runs):
        assert a["clients"].keys() == b["clients"].keys(), (a["round"], a["clients"].keys(), b["clients"].keys())
        for k in a["clients"]:
            for m in ("test_loss", "train_loss"):
                assert a["clients"][k][m] == pytest.approx(b["clients"][k][m], rel=rel), (a["round"], k, m)


def copy_app(dest):
    """A copy of the Flower app (what `flwr run` bundles). `flwr run` on it may migrate its
    [tool.flwr.federations] section into $FLWR_HOME/config.toml and comment it out there, as Flower
    >= 1.26 does on a first run; tests run it on a copy so the checkout's pyproject.toml stays as is."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("pyproject.toml", "README.md", "fedpers", "strategies", "experiments/configs"):
        src, dst = root / name, Path(dest) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return Path(dest)


# ---- Test tiers ---------------------------------------------------------------------------------------
# `python -m pytest -m "not slow"` is the fast tier: 605 tests (2 of them skip without CUDA); at 497 tests it was
# ~225 CPU s of the test process (Ray's workers not counted), 9 minutes of wall time on the 2-core VM under a
# load average of ~10 from other jobs; CI runs everything.
# Tests whose own file marks them slow stay slow; the lists below move the costly rest there, measured in
# CPU seconds per test on the project's 2-core VM (noted beside each entry).
# They live here, by node name, so the tier is decided in one place and test files keep their own text.
SLOW_TESTS = {
    "test_dp.py::test_run_clips_client_deltas_and_reports_epsilon": "~21 CPU s",
    "test_datasets.py::test_synthetic_images_are_deterministic_balanced_and_separable": "~5 CPU s",
    "test_datasets.py::test_rgb_dataset_end_to_end_on_a_stock_timm_vit": "~5 CPU s (2 rounds)",
    "test_config.py::test_every_shipped_config_is_valid": "~5 CPU s (builds every shipped config's data)",
    "test_fast_engine.py::test_batched_clients_match_one_at_a_time": "~4 CPU s",
    "test_fast_engine.py::test_cache_budget_falls_back_to_recomputing": "~2.6 CPU s",
    "test_strategy_semantics.py::test_fedprox_with_mu_zero_is_fedavg_and_mu_changes_it": "~15 CPU s",
    "test_partitions.py::test_every_simulation_saves_its_partition_report": "~4.4 CPU s",
    "test_simulate.py::test_same_seed_same_results_other_seed_differs": "~18 CPU s (three runs)",
    "test_simulate.py::test_any_timm_vit_name_works": "~4.7 CPU s",
    "test_simulate.py::test_partial_participation_samples_per_round": "~4.6 CPU s",
    "test_tracking.py::test_tensorboard_events_hold_each_rounds_metrics_and_the_plots": "~13 CPU s",
    "test_shift.py::test_label_permutation_is_invisible_to_private_zero_init_heads": "~12 CPU s",
    "test_sweep.py::test_smoke_grid_writes_results_and_resumes": "~7 CPU s",
    "test_sweep.py::test_benchmark_grid_is_valid": "~4.2 CPU s",
    "test_sweep.py::test_a_changed_finished_cell_is_refused_and_runs_csv_keeps_every_finished_cell": "~4.5 CPU s",
    "test_strategy_semantics.py::test_fedavg_full_trains_the_backbone_and_refuses_large_ones": "~3.4 CPU s",
    "test_llm_sweep.py::test_llm_grid_reports_perplexity_with_cis_and_both_references": "~17 CPU s (3 LLM cells)",
    # test_llm_run.py: the fast tier keeps the HF-equivalence check (one zero-shot run, ~6 CPU s)
    "test_llm_run.py::test_summary_perplexity_is_the_mean_of_exp_client_losses": "~12 CPU s (a 3-round local run)",
    "test_llm_run.py::test_local_training_lowers_each_speakers_loss_below_zero_shot": "shares that run",
    "test_llm_run.py::test_training_never_touches_the_frozen_weights": "shares that run",
    "test_llm_run.py::test_generations_are_written_for_every_client": "shares that run",
    "test_llm_run.py::test_bad_llm_configs_exit_2_naming_the_field_before_any_run": "~7 CPU s per case (a subprocess)",
    "test_llm_run.py::test_a_backbone_that_is_not_a_causal_lm_is_refused": "~7 CPU s (a subprocess)",
    "test_llm_run.py::test_cross_evaluation_scores_each_speakers_adapter_on_every_speaker": "~8 CPU s",
    "test_reliability.py::test_existing_results_folder_is_refused_kept_and_replaced_only_on_request": "~9.5 CPU s",
    "test_reliability.py::test_resume_of_a_moved_results_folder": "~6.8 CPU s (the fast tier has test_checkpoint's)",
    "test_pfedmoap.py::test_gate_stays_local_and_experts_are_other_clients_uploads": "~8.9 CPU s",
    "test_cross_eval.py::test_off_by_default_and_state_keeps_only_personal_tensors": "~6.5 CPU s",
    # test_checkpoint.py: the fast tier keeps the 2-round stop-and-resume run and the training-free per-strategy
    # resumes (~0.8-1.6 CPU s each); the 4-round reference run is shared by the first three below
    "test_checkpoint.py::test_crash_after_round_2_then_resume_is_bit_identical": "~23 CPU s (with the reference run)",
    "test_checkpoint.py::test_killed_subprocess_resumes_bit_identical": "~22 CPU s (a subprocess, killed, resumed)",
    "test_checkpoint.py::test_resume_can_extend_the_number_of_rounds": "~10 CPU s",
    "test_checkpoint.py::test_resume_refuses_another_experiment_and_a_missing_checkpoint": "~3.6 CPU s",
    "test_checkpoint.py::test_every_strategy_resumes_bit_identical[feddpa]": "~2.7 CPU s",
    "test_checkpoint.py::test_every_strategy_resumes_bit_identical[in_context]": "~2.1 CPU s (the tiny Llama)",
    # test_fast_workers.py: worker processes (CPU s with the workers'); the fast tier keeps the config checks
    "test_fast_workers.py::test_workers_give_the_results_of_one_process": "~28 CPU s (with the shared reference run)",
    "test_fast_workers.py::test_a_killed_worker_is_replaced_and_the_run_goes_on": "~39 CPU s",
    "test_fast_workers.py::test_simulate_with_workers_writes_the_same_results": "~34 CPU s (two runs)",
    "test_fast_workers.py::test_a_client_that_raises_in_a_worker_fails_alone": "~20 CPU s",
    # test_flower_simulation.py: Ray and Flower's simulation engine; the fast tier keeps its one-round run
    "test_flower_simulation.py::test_flower_run_learns_and_writes_results": "Ray + 3 rounds of 4 clients",
    "test_flower_simulation.py::test_flower_and_inprocess_engines_agree": "shares that run, + 3 rounds in process",
    "test_flower_simulation.py::test_faulty_clients_in_the_flower_engine": "Ray + 2 rounds",
    "test_flower_simulation.py::test_text_lora_through_the_flower_engine_matches_the_fast_engine": "Ray + 2 text runs",
    "test_flower_simulation.py::test_llm_through_the_flower_engine_matches_the_fast_engine": "Ray + 2 LLM runs",
    "test_reliability_runs.py::test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder": "~2.3 CPU s",
    "test_robust_aggregation.py::test_one_in_bound_attacker_moves_the_plain_mean_by_its_norm_over_n":
        "~3 CPU s (the first strategy build loads the backbone; the robust cases after it ~0.5 CPU s each)",
    "test_llm_strategies.py::test_feddpa_runs_on_llm_and_keeps_the_local_adapter_home": "33-45 s wall on the shared 2-core VM (2 LLM rounds, per-reply evaluation)",
    "test_deployment.py::test_llm_round_over_tls_supernodes_matches_the_fast_engine": "~150 s wall (TLS SuperLink, 2 SuperNodes, 1 LLM round); the module is marked slow too",
    "test_llm_strategies.py::test_pfedmoap_runs_on_llm_with_soft_prompt_experts": "10-42 s wall on the shared 2-core VM (2 LLM rounds, K+2 passes)",
    "test_llm_strategies.py::test_late_prompt_runs_are_the_same_with_the_cache_on_or_off": "~30 s wall under load (two 2-round pFedMoAP runs)",
}
# The strategy conformance suite runs every registered strategy in the full tier; the fast tier keeps the
# reference algorithm and its main baseline (each case costs 5-11 CPU s, its determinism rerun 5 more).
FAST_CONFORMANCE_CASES = {("pfedpg", "vision"), ("fedvpt", "vision")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path, _, name = item.nodeid.partition("::")
        module = path.rsplit("/", 1)[-1]
        if f"{module}::{name}" in SLOW_TESTS or f"{module}::{name.split('[')[0]}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        elif module == "test_strategy_conformance.py" and hasattr(item, "callspec"):
            case = item.callspec.params.get("two_rounds")
            other_case = case is not None and tuple(case) not in FAST_CONFORMANCE_CASES
            rerun = name.startswith("test_deterministic_for_a_seed") and tuple(case or ()) != ("pfedpg", "vision")
            if other_case or rerun:
                item.add_marker(pytest.mark.slow)
