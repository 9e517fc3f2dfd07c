"""Bootstrap CIs, paired differences and their place in the sweep's table.md."""

import json
import math

import numpy as np
import pytest

from fedpers.sweep import stats as sr
from fedpers.sweep.cli import write_table


def test_ci_brackets_the_estimate_and_shrinks_with_more_clients():
    rng = np.random.default_rng(0)
    small = [rng.normal(0.6, 0.2, 10) for _ in range(5)]
    large = [rng.normal(0.6, 0.2, 200) for _ in range(5)]
    e1, lo1, hi1 = sr.hier_bootstrap(small)
    e2, lo2, hi2 = sr.hier_bootstrap(large)
    assert lo1 < e1 < hi1 and lo2 < e2 < hi2
    assert (hi2 - lo2) < 0.6 * (hi1 - lo1)


def test_constant_data_has_a_zero_width_ci():
    assert sr.hier_bootstrap([np.full(7, 0.25), np.full(3, 0.25)]) == pytest.approx((0.25, 0.25, 0.25))


def test_seeds_weigh_equally_whatever_their_client_count():
    est, _, _ = sr.hier_bootstrap([np.zeros(100), np.ones(4)])
    assert est == pytest.approx(0.5)


def test_seed_variation_widens_the_ci():
    """Between-seed spread must enter the CI: same clients, but seeds offset by +-0.1 gives a wider CI
    than seeds that agree (a bootstrap over pooled clients only would not see it)."""
    rng = np.random.default_rng(1)
    base = [rng.normal(0.5, 0.05, 50) for _ in range(5)]
    offsets = [-0.1, 0.1, -0.1, 0.1, 0.0]
    _, lo_a, hi_a = sr.hier_bootstrap(base)
    _, lo_b, hi_b = sr.hier_bootstrap([b + o for b, o in zip(base, offsets)])
    assert (hi_b - lo_b) > 2 * (hi_a - lo_a)


def test_worst10_takes_the_lowest_tenth():
    x = np.arange(1, 61, dtype=float)  # 60 clients: the 6 lowest are 1..6
    assert sr.worst10(x) == pytest.approx(3.5)
    assert sr.worst10(np.array([5.0, 1.0, 3.0])) == 1.0


def test_paired_difference_cancels_client_spread():
    """Clients differ a lot (0.2-0.9) but the strategy is exactly 0.03 above the reference on every one:
    the paired CI is [3, 3] pp and excludes 0, although the two cells' own CIs overlap."""
    rng = np.random.default_rng(2)
    ref = {s: {str(c): float(v) for c, v in enumerate(rng.uniform(0.2, 0.9, 30))} for s in range(5)}
    better = {s: {c: v + 0.03 for c, v in accs.items()} for s, accs in ref.items()}
    d = sr.paired(better, ref)
    assert d["diff"] == pytest.approx((0.03, 0.03, 0.03)) and d["significant"]
    a, b = sr.cell_stats(better)["mean"], sr.cell_stats(ref)["mean"]
    assert a[1] < b[2]  # unpaired intervals overlap: only pairing separates them


def test_paired_difference_uses_only_shared_clients_and_seeds():
    ref = {0: {"0": 0.5, "1": 0.5}, 1: {"0": 0.5}}
    other = {0: {"1": 0.7, "2": 0.1}, 2: {"0": 0.0}}
    d = sr.paired(other, ref)
    assert d["pairs"] == 1 and d["seeds"] == 1 and d["diff"][0] == pytest.approx(0.2)
    assert sr.paired({3: {"0": 1.0}}, ref) is None


def test_noise_only_difference_is_not_significant():
    rng = np.random.default_rng(3)
    ref = {s: {str(c): float(v) for c, v in enumerate(rng.uniform(0.2, 0.9, 40))} for s in range(5)}
    noisy = {s: {c: v + float(rng.normal(0, 0.05)) for c, v in accs.items()} for s, accs in ref.items()}
    d = sr.paired(noisy, ref)
    assert d["diff"][1] < 0 < d["diff"][2] and not d["significant"]


def _fake_grid(tmp_path, accs: dict[tuple[str, str, int], list[float]]) -> list[dict]:
    rows = []
    for (p, s, seed), vals in accs.items():
        out = tmp_path / p / s / f"seed{seed}"
        out.mkdir(parents=True)
        summary = {"final": {"per_client": {str(i): v for i, v in enumerate(vals)}}, "unseen": None}
        (out / "summary.json").write_text(json.dumps(summary))
        rows.append({"partition": p, "strategy": s, "seed": seed, "status": "ok", "output_dir": str(out),
                     "accuracy_mean": float(np.mean(vals)), "accuracy_worst10": sr.worst10(np.array(vals)),
                     "unseen_accuracy_mean": None, "params_per_round": 10, "bytes_per_round": 40.0})
    return rows


def test_table_marks_differences_whose_ci_excludes_zero(tmp_path):
    rng = np.random.default_rng(4)
    accs = {}
    for seed in range(3):
        ref = rng.uniform(0.3, 0.8, 50)
        accs[("dir", "pfedpg", seed)] = list(ref)
        accs[("dir", "worse", seed)] = list(ref - 0.1)  # clearly below, on every client
        accs[("dir", "same", seed)] = list(ref + rng.normal(0, 0.02, 50))  # indistinguishable
    rows = _fake_grid(tmp_path, accs)
    text = write_table(rows, tmp_path / "table.md", "t")
    diff = text.split("paired difference to pfedpg")[1]
    worse = next(line for line in diff.splitlines() if line.startswith("| worse |"))
    same = next(line for line in diff.splitlines() if line.startswith("| same |"))
    assert "**-10.0 [-10.0, -10.0]** *" in worse
    assert "*" not in same
    assert "| pfedpg | 3 | 50 |" in text
    sr.plot(rows, tmp_path / "plots")
    assert (tmp_path / "plots" / "accuracy_ci.png").is_file() and (tmp_path / "plots" / "paired_diff.png").is_file()
    # A grid's own reference: the same cells, differences now taken to "worse".
    text = write_table(rows, tmp_path / "table.md", "t", reference="worse")
    assert "paired difference to pfedpg" not in text
    diff = text.split("paired difference to worse")[1]
    assert "**+10.0 [+10.0, +10.0]** *" in next(line for line in diff.splitlines() if line.startswith("| pfedpg |"))


def test_small_tails_are_flagged(tmp_path):
    rows = _fake_grid(tmp_path, {("p", "pfedpg", 0): [0.5] * 10, ("p", "big", 0): list(np.linspace(0, 1, 50))})
    text = "\n".join(sr.sections(rows))
    small = next(line for line in text.splitlines() if line.startswith("| pfedpg |"))
    big = next(line for line in text.splitlines() if line.startswith("| big |"))
    assert "†" in small and "†" not in big  # 10 clients: a 1-client tail; 50 clients: 5
    assert not math.isnan(sr.cell_stats({0: {"0": 0.1}})["mean"][0])


def test_no_paired_section_without_a_reference_or_without_others(tmp_path):
    only_ref = _fake_grid(tmp_path / "a", {("p", "pfedpg", 0): [0.5, 0.6]})
    assert "paired difference" not in "\n".join(sr.sections(only_ref))
    no_ref = _fake_grid(tmp_path / "b", {("p", "fedvpt", 0): [0.5, 0.6]})
    assert "no strategy labelled 'pfedpg'" in "\n".join(sr.sections(no_ref))


def test_llm_cells_report_perplexity_from_per_client_losses(tmp_path):
    """LLM summaries carry per-client mean NLLs: perplexity = exp(loss) per client, worst-10% = the highest
    perplexities, differences to each of several references with the sign of ppl(strategy) - ppl(ref)."""
    rng = np.random.default_rng(1)
    rows = []
    losses = {}
    for seed in range(2):
        base = rng.uniform(3.0, 4.0, 20)
        for s, shift in (("local", 0.0), ("pfedpg", -0.2), ("fedit", 0.3)):
            loss = base + shift
            losses[(s, seed)] = loss
            out = tmp_path / s / f"seed{seed}"
            out.mkdir(parents=True)
            final = {"per_client": {str(i): 0.3 for i in range(20)},
                     "per_client_loss": {str(i): float(v) for i, v in enumerate(loss)}}
            (out / "summary.json").write_text(json.dumps({"final": final, "unseen": None}))
            rows.append({"partition": "speakers", "strategy": s, "seed": seed, "status": "ok", "output_dir": str(out)})
    assert [m.name for m in sr.metrics_of(rows)] == ["perplexity", "nll", "accuracy"]
    st = sr.cell_stats(sr.collect(rows, metric=sr.PERPLEXITY)[("speakers", "local")], sr.PERPLEXITY)
    ppl = [np.exp(losses[("local", seed)]) for seed in range(2)]
    assert abs(st["mean"][0] - np.mean([p.mean() for p in ppl])) < 1e-9
    assert abs(st["worst10"][0] - np.mean([np.sort(p)[-2:].mean() for p in ppl])) < 1e-9  # the 2 highest of 20
    text = "\n".join(sr.sections(rows, ["local", "pfedpg"]))
    to_local = text.split("Perplexity: paired difference to local")[1].split("##")[0]
    pf = next(line for line in to_local.splitlines() if line.startswith("| pfedpg |"))
    fi = next(line for line in to_local.splitlines() if line.startswith("| fedit |"))
    assert "**-" in pf and "**+" in fi  # lower loss = lower perplexity = a negative difference
    assert "Perplexity: paired difference to pfedpg" in text and "Next-token accuracy" in text
    sr.plot(rows, tmp_path / "plots", ["local", "pfedpg"])
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["accuracy_ci.png", "nll_ci.png", "paired_diff.png", "paired_diff_nll.png",
                     "paired_diff_nll_pfedpg.png", "paired_diff_perplexity.png",
                     "paired_diff_perplexity_pfedpg.png", "paired_diff_pfedpg.png", "perplexity_ci.png"]


def test_llm_nll_speaks_for_the_typical_speaker_where_one_diverged_speaker_carries_the_perplexity_mean(tmp_path):
    """A strategy 0.1 nats better than local on 19 of 20 speakers whose adapter diverged on the 20th
    (loss 10: perplexity 22,026): its perplexity mean is far worse than local's, its mean NLL is the
    hand-computed (19 * -0.1 + (10 - base)) / 20 better or worse, and the NLL table shows 3 decimals."""
    base = np.linspace(3.5, 4.5, 20)
    rows = []
    for s, loss in (("local", base), ("fedit", np.r_[base[:19] - 0.1, 10.0])):
        out = tmp_path / s / "seed0"
        out.mkdir(parents=True)
        final = {"per_client": {str(i): 0.3 for i in range(20)},
                 "per_client_loss": {str(i): float(v) for i, v in enumerate(loss)}}
        (out / "summary.json").write_text(json.dumps({"final": final, "unseen": None}))
        rows.append({"partition": "speakers", "strategy": s, "seed": 0, "status": "ok", "output_dir": str(out)})
    cells = sr.collect(rows, metric=sr.NLL)
    d = sr.paired(cells[("speakers", "fedit")], cells[("speakers", "local")])
    assert abs(d["diff"][0] - (19 * -0.1 + (10.0 - base[19])) / 20) < 1e-9
    ppl = sr.paired(sr.collect(rows, metric=sr.PERPLEXITY)[("speakers", "fedit")],
                    sr.collect(rows, metric=sr.PERPLEXITY)[("speakers", "local")])
    assert ppl["diff"][0] > 1000  # the one speaker carries the perplexity mean
    text = "\n".join(sr.sections(rows, "local"))
    nll = text.split("Reply NLL (nats per token): paired difference to local")[1].split("##")[0]
    line = next(x for x in nll.splitlines() if x.startswith("| fedit |"))
    assert f"{(19 * -0.1 + (10.0 - base[19])) / 20:+.3f}" in line
