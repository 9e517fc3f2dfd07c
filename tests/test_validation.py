"""The validation split (data.val_fraction): carved from the training rows, scored by the strategy's own
evaluator every round; rounds and tuned variants are chosen on it, never on test."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedpers.data.partition import build_federated
from fedpers.experiment import from_layers
from fedpers.payload import validate_reply
from fedpers.results.validation import ValidationTrack
from fedpers.sweep import cli
from fedpers.sweep.selection import parse_select, selected_rows

ROOT = Path(__file__).resolve().parents[1]

TINY = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments/configs/tiny.yaml"))


def _fed(**data):
    cfg = from_layers([TINY, {"data": data}])
    return build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)


def _rows_of(x):
    return {tuple(r.flatten()[:16].tolist()) for r in x}


def test_validation_is_carved_from_training_rows_and_leaves_test_alone():
    plain, with_val = _fed(), _fed(val_fraction=0.25)
    for a, b in zip(plain.clients, with_val.clients):
        assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
        assert not a.has_validation and b.has_validation
        train, val = _rows_of(b.x_train), _rows_of(b.x_val)
        assert not train & val  # disjoint
        assert train | val == _rows_of(a.x_train)  # together: the training rows of a run without validation
        n = len(a.y_train) + len(a.y_test)
        assert len(b.y_val) == round(0.25 * n)
    again = _fed(val_fraction=0.25)  # seeded: the same rows in every run (and so for every strategy)
    assert all(torch.equal(x.x_val, y.x_val) for x, y in zip(with_val.clients, again.clients))


def test_validation_view_puts_validation_where_evaluators_read_test():
    c = _fed(val_fraction=0.25).clients[0]
    v = c.validation_view()
    assert v.x_test is c.x_val and v.y_test is c.y_val and torch.equal(v.x_train, c.x_train)
    with pytest.raises(ValueError):
        _fed().clients[0].validation_view()


def test_validation_fraction_is_checked_before_any_work():
    from fedpers.config import ConfigError

    for bad in (-0.1, 0.85):  # 0.85 + test_fraction 0.2 leaves no training data
        with pytest.raises(ConfigError, match="data.val_fraction"):
            from_layers([TINY, {"data": {"val_fraction": bad}}])


def test_a_client_scores_validation_with_its_strategys_own_evaluator(monkeypatch):
    """A strategy whose prediction is not one forward pass (FedDPA's per-instance mixture, in-context's
    shots) must score validation as it scores test: the reply's val_* come from evaluate_model on the
    validation split."""
    from fedpers.rounds.client_round import client_round
    from strategies import get_strategy_class

    cfg = from_layers([TINY, {"data": {"val_fraction": 0.25}, "strategy": {"name": "fedvpt"}}])
    cls = get_strategy_class("fedvpt")
    seen = []

    def fake(ctx, tensors):
        seen.append(len(ctx.data.y_test))
        return 0.321, 0.654

    monkeypatch.setattr(cls, "evaluate_model", classmethod(lambda c, ctx, t: fake(ctx, t)))
    from fedpers.client import make_context, start_tensors

    ctx = make_context(cfg, 0, 1)
    received = {k: v.numpy() for k, v in start_tensors(ctx, {}, {}).items() if k in cls.sends}
    reply, _ = client_round(cfg, 0, 1, received, {})
    assert reply.metrics["val_loss"] == 0.321 and reply.metrics["val_accuracy"] == 0.654
    assert seen == [len(ctx.data.y_val)]  # called once, on the validation split
    assert reply.metrics["num_val"] == len(ctx.data.y_val)
    assert reply.metrics["test_accuracy"] != 0.654  # test still scored on test


def _row(r, acc, val, ppl=None, vppl=None):
    as_of = {"accuracy_mean": acc, "val_accuracy_mean": val, "test_loss_mean": 0.0, "val_loss_mean": 0.0}
    if ppl is not None:
        as_of.update(perplexity_mean=ppl, val_perplexity_mean=vppl)
    return {"round": r, "as_of_round": as_of}


def test_the_best_round_is_chosen_on_validation_not_test():
    rows = [_row(1, 0.50, 0.60), _row(2, 0.90, 0.55), _row(3, 0.70, 0.70), _row(4, 0.95, 0.65)]
    v = ValidationTrack(llm=False).summary(rows)
    assert v["best_round"] == 3 and v["criterion"] == "val_accuracy_mean"
    assert v["at_best_round"]["accuracy_mean"] == 0.70  # test there, not the test-best 0.95
    assert v["at_last_round"]["accuracy_mean"] == 0.95 and v["last_round"] == 4
    llm = [_row(1, 0.3, 0.3, 50.0, 60.0), _row(2, 0.3, 0.3, 40.0, 45.0), _row(3, 0.3, 0.3, 30.0, 47.0)]
    w = ValidationTrack(llm=True).summary(llm)
    assert w["best_round"] == 2 and w["best"] == "min"  # lowest validation perplexity
    assert w["at_best_round"]["perplexity_mean"] == 40.0
    assert ValidationTrack(llm=False).summary([{"round": 1}]) is None


def test_a_reply_with_an_impossible_validation_accuracy_is_rejected():
    from fedpers.payload import Reply

    ok = {"train_loss": 1.0, "test_loss": 1.0, "test_accuracy": 0.5, "num_test": 4.0}
    assert validate_reply(Reply(0, {}, 3, {**ok, "val_loss": 1.0, "val_accuracy": 0.5}), {}, 1e4) is None
    assert validate_reply(Reply(0, {}, 3, {**ok, "val_loss": 1.0, "val_accuracy": 1.5}), {}, 1e4) is not None
    assert validate_reply(Reply(0, {}, 3, {**ok, "val_loss": math.nan, "val_accuracy": 0.5}), {}, 1e4) is not None


def _cell(tmp_path, p, s, seed, val_score, test_acc, crit="val_accuracy_mean"):
    d = tmp_path / p / s / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"final": {"per_client": {"0": test_acc}}}))
    return {"partition": p, "strategy": s, "seed": seed, "status": "ok", "output_dir": str(d),
            "val_criterion": crit, "val_score": val_score, "accuracy_mean": test_acc}


def test_a_grid_picks_its_variant_on_validation_only(tmp_path):
    rows = []
    for seed in (0, 1):  # variant b is better on test, a on validation: a must win
        rows += [_cell(tmp_path, "p", "a", seed, 0.80, 0.60), _cell(tmp_path, "p", "b", seed, 0.70, 0.90)]
    chosen, notes = selected_rows(rows, {"gen": ["a", "b"]})
    assert {r["selected_variant"] for r in chosen} == {"a"} and {r["strategy"] for r in chosen} == {"gen"}
    assert sorted(r["seed"] for r in chosen) == [0, 1] and "gen on p: a" in notes[0]
    ppl = [_cell(tmp_path, "q", "a", 0, 30.0, 0.1, "val_perplexity_mean"),
           _cell(tmp_path, "q", "b", 0, 20.0, 0.1, "val_perplexity_mean")]
    chosen, _ = selected_rows(ppl, {"gen": ["a", "b"]})
    assert [r["selected_variant"] for r in chosen] == ["b"]  # lower validation perplexity wins
    no_val = [{**r, "val_score": ""} for r in rows]
    chosen, notes = selected_rows(no_val, {"gen": ["a", "b"]})
    assert chosen == [] and "data.val_fraction" in notes[0]


@pytest.mark.parametrize("select, field", [({"gen": ["fedvpt"]}, "grid.select.gen"),
                                           ({"gen": ["fedvpt", "nope"]}, "grid.select.gen"),
                                           ({"fedvpt": ["fedvpt", "pfedpg_fast"]}, "grid.select.fedvpt"),
                                           (["fedvpt"], "grid.select")])
def test_bad_select_groups_exit_2_naming_the_field(tmp_path, capsys, select, field):
    grid = OmegaConf.to_container(OmegaConf.load(ROOT / "experiments/configs/benchmark_smoke.yaml"))
    grid["select"] = select
    path = tmp_path / "grid.yaml"
    path.write_text(OmegaConf.to_yaml(grid))
    assert cli.main([str(path), "--dry-run", "--output-dir", str(tmp_path / "out")]) == 2
    assert field in capsys.readouterr().err
    assert parse_select(None, ["a"]) == {}


def test_the_report_says_which_round_its_test_figures_are_from(tmp_path):
    from fedpers.sweep.report import write_table

    rows = [{**_cell(tmp_path, "p", "a", 0, 0.8, 0.6), "accuracy_worst10": 0.5, "unseen_accuracy_mean": None,
             "params_per_round": 10, "bytes_per_round": 40.0, "val_best_round": 2, "accuracy_at_best_val": 0.55}]
    text = write_table(rows, tmp_path / "table.md", "t", reference="a", selection_notes=["- gen on p: a"])
    assert "Test figures are at the last round" in text and "validation-best round" in text
    assert "| a | 40 | 55.0 ± 0.0 |" in text  # the pivot at the validation-best round
    assert "## Variants selected on validation" in text


def test_learning_curves_average_each_strategys_rounds_over_seeds(tmp_path):
    from fedpers.sweep.curves import curves, plot_curves

    rows = []
    for seed, accs in ((0, [0.2, 0.4, 0.6]), (1, [0.4, 0.6, 0.7, 0.9])):  # seed 1 ran a round more
        d = tmp_path / "p" / "gen" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "rounds.csv").write_text("round,accuracy_mean\n" + "".join(f"{i + 1},{a}\n" for i, a in enumerate(accs)))
        rows.append({"partition": "p", "strategy": "gen", "seed": seed, "status": "ok", "output_dir": str(d)})
    x, mean, lo, hi = curves(rows, "accuracy_mean")[("p", "gen")]
    assert x.tolist() == [1, 2, 3]  # the rounds every seed reached
    assert np.allclose(mean, [0.3, 0.5, 0.65]) and np.allclose(lo, [0.2, 0.4, 0.6]) and np.allclose(hi, [0.4, 0.6, 0.7])
    assert [p.name for p in plot_curves(rows, tmp_path / "plots")] == ["curves_accuracy.png"]


def test_a_select_group_as_reference_marks_its_own_variant_instead_of_a_zero_difference(tmp_path):
    from fedpers.sweep.stats import sections

    rows = []
    for seed in (0, 1):  # a wins on validation, so the group's cells are a's: a - gen is 0 by construction
        rows += [_cell(tmp_path, "p", "a", seed, 0.80, 0.60), _cell(tmp_path, "p", "b", seed, 0.70, 0.90),
                 _cell(tmp_path, "p", "local", seed, None, 0.50)]
    chosen, _ = selected_rows(rows, {"gen": ["a", "b"]})
    text = "\n".join(sections(rows + chosen, reference=["local", "gen"]))
    to_gen = text.split("paired difference to gen")[1]
    assert "| a | selected |" in to_gen and "| b | **+30.0" in to_gen and "| local | **-10.0" in to_gen
    to_local = text.split("paired difference to local")[1].split("paired difference to gen")[0]
    assert "| a | **+10.0" in to_local and "selected" not in to_local
