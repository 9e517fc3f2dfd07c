"""``python -m fedpers.gpu_check`` on the CPU: the script a GPU machine runs works end to end here."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_check_round_part_on_cpu_writes_its_figures(tmp_path):
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-m", "fedpers.gpu_check", "--device", "cpu", "--quick",
                        "--parts", "vit_b16_round", "--backbone", "vit_fedpers_digits:8", "--output", str(out)],
                       check=False, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())["vit_b16_round"]
    assert r["rc"] == 0 and r["failed"] == []
    assert r["clients"] == 4 and r["train_samples"] > 0
    # The "device" here is the CPU itself, so the batched round and the CPU reference are the same
    # computation: any difference would mean the comparison pairs the wrong clients or tensors.
    assert r["rel_diff_vs_cpu_max"] == 0.0 and len(r["rel_diff_vs_cpu"]) == 2 * 3  # delta/prompts + head
    # Trained, not only decayed: weight decay alone gives a delta parallel to the prompts (fraction ~1e-7).
    # A few steps from a zero head move the prompts only a little, so the bound sits far above rounding
    # error but far below what training gives (0.12-0.2 seen on two machines).
    assert r["prompt_delta_orthogonal_fraction"] > 1e-3


def test_gpu_check_rejects_an_unknown_part(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedpers.gpu_check", "--device", "cpu", "--parts", "warp"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "allowed: tests, bench, vit_b16_round" in p.stderr
