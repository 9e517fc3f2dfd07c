"""A grid of LLM cells on the tiny Llama: the sweep reports perplexity (and next-token accuracy) per client."""

import csv
import json
import math

import yaml

from tests.llm_helpers import llm_tiny_overrides


def test_llm_grid_reports_perplexity_with_cis_and_both_references(tmp_path):
    from fedpers.sweep.cli import main

    base = dict(o.split("=", 1) for o in llm_tiny_overrides(tmp_path / "unused"))
    for k in ("run.output_dir", "run.engine", "run.progress"):
        base.pop(k)
    base.update({"run.rounds": 1, "model.llm.generations": 0})
    grid = {"output_dir": str(tmp_path / "out"), "base": base, "strategies": ["zero_shot", "local", "fedit"],
            "partitions": {"speakers": {}}, "seeds": [0], "reference": ["local", "zero_shot"]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert main([str(tmp_path / "grid.yaml"), "--jobs", "1", "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    for r in rows:  # runs.csv's perplexity is the summary's: the mean over clients of exp(per-client loss)
        final = json.loads((tmp_path / "out" / "speakers" / r["strategy"] / "seed0" / "summary.json").read_text())["final"]
        losses = list(final["per_client_loss"].values())
        assert abs(float(r["perplexity_mean"]) - sum(math.exp(v) for v in losses) / len(losses)) < 1e-9
        assert abs(float(r["nll_mean"]) - sum(losses) / len(losses)) < 1e-12  # the mean of the logs, not the log
    text = (tmp_path / "out" / "table.md").read_text()
    assert "## reply NLL (nats per token) by partition setting" in text
    assert "## perplexity by partition setting" in text and "next-token accuracy by partition setting" in text
    assert "Perplexity: paired difference to local" in text and "Perplexity: paired difference to zero_shot" in text
    plots = {p.name for p in (tmp_path / "out" / "plots").iterdir()}
    assert {"perplexity_ci.png", "perplexity_vs_bytes.png", "nll_vs_bytes.png", "paired_diff_perplexity.png",
            "paired_diff_perplexity_zero_shot.png"} <= plots
