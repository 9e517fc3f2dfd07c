"""The llm modality end to end on a tiny random Llama (tests/llm_helpers.py) and the chitchat speakers:
the reported losses are the frozen model's own, training moves them, summary figures are what the
per-client numbers say, generations are written, and bad configs stop before any work."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpers import simulate
from tests.llm_helpers import llm_tiny_overrides, tiny_llm_folder


def _run(out, **extra):
    assert simulate.main(llm_tiny_overrides(out, **extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_shot")
    return out, *_run(out, **{"strategy.name": "zero_shot"})


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, *_run(out, **{"strategy.name": "local", "run.rounds": 3, "client.local_epochs": 3,
                              "client.optimizer": "adamw", "client.lr": 0.01, "client.weight_decay": 0.0})


def test_zero_shot_loss_is_the_plain_hf_models_target_nll(zero_shot):
    """Every client's reported test loss equals the token-weighted NLL of the reply tokens computed
    directly with transformers' model on the same prepared rows: the peft wrapper, the target-only
    projection, the context mask and the aggregation over batches must all agree with it."""
    from transformers import AutoModelForCausalLM

    from fedpers.client import make_context
    from fedpers.experiment import from_yaml

    out, _summary, rows = zero_shot
    cfg = from_yaml((out / "config.yaml").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tiny_llm_folder(), dtype=torch.float32).eval()
    reported = rows[-1]["clients"]
    assert set(reported) == {str(p) for p in range(cfg.run.num_clients)}
    for pid, got in reported.items():
        ctx = make_context(cfg, int(pid), cfg.run.rounds)
        batch = ctx.model.prepare(ctx.data.x_test)
        with torch.no_grad():
            logits = hf(input_ids=batch.ids, attention_mask=batch.mask).logits
        labels = batch.labels.clone()
        labels[~batch.target] = -100  # the context's and the padding's tokens never count
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
        tokens = int((labels[:, 1:] != -100).sum())
        assert tokens > 0
        assert abs(got["test_loss"] - float(nll) / tokens) < 1e-4, pid
        correct = int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)).sum())
        assert abs(got["accuracy"] - correct / tokens) < 1e-6, pid


def test_summary_perplexity_is_the_mean_of_exp_client_losses(zero_shot, local):
    for _out, summary, rows in (zero_shot, local):
        last = {}
        for r in rows:
            last.update({k: v["test_loss"] for k, v in r["clients"].items()})
        ppl = [math.exp(v) for v in last.values()]
        f = summary["final"]
        assert abs(f["perplexity_mean"] - float(np.mean(ppl))) < 1e-6 * f["perplexity_mean"]
        k = max(1, math.ceil(0.1 * len(ppl)))
        assert abs(f["perplexity_worst10"] - float(np.mean(sorted(ppl)[-k:]))) < 1e-6 * f["perplexity_worst10"]
        assert f["per_client_loss"] == {k: last[k] for k in sorted(last, key=int)}


def test_held_out_speakers_losses_are_in_the_summary_for_the_sweeps_cis(tmp_path, zero_shot):
    """summary.json's unseen block carries each held-out speaker's reply NLL (the sweep's unseen CIs read
    it): for the frozen model it is that speaker's loss in a run where it trained, and the unseen
    perplexity mean is the mean of their exps."""
    _, _, rows = zero_shot
    summary, _ = _run(tmp_path / "held_out", **{"strategy.name": "zero_shot", "run.holdout_clients": 1,
                                                              "run.clients_per_round": 3})
    unseen = summary["unseen"]["per_client_loss"]
    assert set(unseen) == {str(p) for p in summary["unseen"]["partition_ids"]} and len(unseen) == 1
    for pid, loss in unseen.items():
        assert abs(loss - rows[-1]["clients"][pid]["test_loss"]) < 1e-6
    mean = float(np.mean([math.exp(v) for v in unseen.values()]))
    assert abs(summary["final"]["unseen_perplexity_mean"] - mean) < 1e-6 * mean


def test_local_training_lowers_each_speakers_loss_below_zero_shot(zero_shot, local):
    """The frozen model is the starting point of every adapter (LoRA B = 0): after three rounds of local
    training each speaker's reply loss must be below the untouched model's, on train and test data."""
    _, _, zs = zero_shot
    _, _, lo = local
    before = {k: v["test_loss"] for k, v in zs[-1]["clients"].items()}
    after = {k: v["test_loss"] for k, v in lo[-1]["clients"].items()}
    assert set(before) == set(after)
    assert all(after[k] < before[k] for k in before), (before, after)
    first_train = lo[0]["clients"]
    last_train = lo[-1]["clients"]
    assert all(last_train[k]["train_loss"] < first_train[k]["train_loss"] for k in first_train)


def test_training_never_touches_the_frozen_weights(local):
    from transformers import AutoModelForCausalLM

    from fedpers.client import client_setup
    from fedpers.experiment import from_yaml

    out, _, _ = local
    cfg = from_yaml((out / "config.yaml").read_text())
    live = client_setup(cfg).model.base.state_dict()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llm_folder(), dtype=torch.float32).state_dict()
    for k, v in fresh.items():
        key = next((n for n in live if n.endswith(k) or n.replace(".base_layer", "").endswith(k)), None)
        assert key is not None, k
        assert torch.equal(live[key], v), k


def test_generations_are_written_for_every_client(local):
    out, summary, _ = local
    files = sorted((out / "generations").glob("client_*.jsonl"))
    assert [f.name for f in files] == [f"client_{p}.jsonl" for p in range(summary["num_clients"])]
    for f in files:
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        assert len(lines) == 1  # model.llm.generations=1
        assert set(lines[0]) == {"round", "context", "reference", "generated"}
        assert lines[0]["round"] == summary["rounds"] and isinstance(lines[0]["generated"], str)


def _refused(tmp_path, *overrides, capsys=None):
    """The CLI's exit code and stderr: in process through ``simulate.main`` (what ``python -m
    fedpers.simulate`` exits with) when ``capsys`` is given, else in a subprocess."""
    args = llm_tiny_overrides(tmp_path / "out", **{"strategy.name": "local", **dict(o.split("=", 1) for o in overrides)})
    if capsys is not None:
        rc = simulate.main(args)
        return rc, capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "fedpers.simulate", *args], capture_output=True, text=True,
                       timeout=300, check=False)
    return r.returncode, r.stderr


@pytest.mark.parametrize("overrides,field", [
    (("model.lora.targets=[no_such_module]",), "model.lora.targets"),
    (("model.llm.context_tokens=8",), "context_tokens"),
    (("data.dialogue.min_utterances=100000",), "data.dialogue.min_utterances"),
    (("run.batch_clients=true", "run.engine=fast"), "run.batch_clients"),
    (("client.optimizer=adam",), "client.optimizer"),
    (("model.adapter=prefix", "model.llm.adapter_from_layer=1"), "model.llm.adapter_from_layer"),
    (("model.llm.adapter_from_layer=99",), "adapter_from_layer"),
])
def test_bad_llm_configs_exit_2_naming_the_field_before_any_run(tmp_path, capsys, overrides, field):
    # the first case through the real command line, the others in process (a subprocess costs ~7 s each)
    rc, err = _refused(tmp_path, *overrides, capsys=None if field == "model.lora.targets" else capsys)
    assert rc == 2 and field in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no round ran


def test_a_backbone_that_is_not_a_causal_lm_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from tests.llm_helpers import tiny_tokenizer

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rc, err = _refused(tmp_path, f"model.backbone={folder}", capsys=capsys)
    assert rc == 2 and "model.backbone" in err, err


def test_cross_evaluation_scores_each_speakers_adapter_on_every_speaker(tmp_path):
    """run.cross_eval on the llm modality: the diagonal is each speaker's own last evaluation, and the
    perplexity gap is computed from the matrix's losses."""
    import csv

    out = tmp_path / "ce"
    summary, rows = _run(out, **{"strategy.name": "fedsa_lora", "run.cross_eval": "true",
                                 "client.optimizer": "adamw", "client.lr": 0.01})
    cells = {(int(r["model_client"]), int(r["data_client"])): (float(r["accuracy"]), float(r["loss"]))
             for r in csv.DictReader((out / "cross_eval.csv").open())}
    n = summary["num_clients"]
    assert set(cells) == {(m, d) for m in range(n) for d in range(n)}
    own = rows[-1]["clients"]
    for m in range(n):
        assert abs(cells[(m, m)][0] - own[str(m)]["accuracy"]) < 1e-6
        assert abs(cells[(m, m)][1] - own[str(m)]["test_loss"]) < 1e-6
    ce = summary["final"]["cross_eval"]
    own_ppl = np.mean([math.exp(cells[(m, m)][1]) for m in range(n)])
    others = np.mean([np.mean([math.exp(cells[(m, d)][1]) for d in range(n) if d != m]) for m in range(n)])
    assert abs(ce["own_perplexity"] - own_ppl) < 1e-4 * own_ppl
    assert abs(ce["perplexity_gap"] - (others - own_ppl)) < 1e-4 * own_ppl
