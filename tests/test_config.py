import subprocess
import sys

import pytest

from fedpers.config import ConfigError, ExperimentConfig, to_yaml

from fedpers.experiment import from_yaml, load_config

REQUIRED_KEYS = [
    "run.seed", "run.rounds", "run.num_clients", "run.clients_per_round", "run.output_dir", "strategy.name",
    "data.dataset", "data.partitioner.name", "data.partitioner.alpha", "model.backbone", "model.num_prompts",
    "client.local_epochs", "client.lr", "client.batch_size",
]


def test_defaults_are_valid_and_round_trip_through_yaml():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.strategy.name, cfg.data.partitioner.name, cfg.data.partitioner.alpha) == ("pfedpg", "dirichlet", 0.1)
    assert cfg.run.num_clients == 10 and cfg.run.engine == "flower"
    again = from_yaml(to_yaml(cfg))
    assert again == cfg


def test_required_keys_exist_and_accept_overrides():
    values = {
        "run.seed": 3, "run.rounds": 4, "run.num_clients": 6, "run.clients_per_round": 2, "run.output_dir": "x",
        "strategy.name": "fedvpt", "data.dataset": "digits", "data.partitioner.name": "iid",
        "data.partitioner.alpha": 0.5, "model.backbone": "vit_tiny_patch16_224", "model.num_prompts": 4,
        "client.local_epochs": 3, "client.lr": 0.2, "client.batch_size": 16,
    }
    assert sorted(values) == sorted(REQUIRED_KEYS)
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    for key, want in values.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj == want, key


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  rounds: 7\n  seed: 5\nstrategy:\n  name: pfedpg\n  server_lr: 0.01\n")
    cfg = load_config(f, ["run.seed=6"])
    assert (cfg.run.rounds, cfg.run.seed, cfg.strategy.server_lr) == (7, 6, 0.01)


@pytest.mark.parametrize(
    "override, field",
    [
        ("run.nope=1", "run.nope"),
        ("run.rounds=abc", "run.rounds"),
        ("run.rounds=0", "run.rounds"),
        ("run.clients_per_round=11", "run.clients_per_round"),
        ("data.partitioner.name=zipf", "data.partitioner.name"),
        ("data.partitioner.alpha=0", "data.partitioner.alpha"),
        ("data.dataset=mnist_typo", "data.dataset"),
        ("client.lr=-1", "client.lr"),
        ("strategy.name=nope", "strategy.name"),
        ("strategy.server_lr=0", "strategy.server_lr"),
        ("strategy.bogus=1", "strategy.bogus"),
        ("model.checkpoint=/no/such/file.safetensors", "model.checkpoint"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.field == field
    assert field in str(e.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="allowed: iid, dirichlet, pathological"):
        load_config(None, ["data.partitioner.name=zipf"])


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedpers.simulate", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_rejects_bad_config_before_training(tmp_path):
    out = tmp_path / "never"
    p = _cli("run.rounds=-2", f"run.output_dir={out}")
    assert p.returncode == 2
    assert "run.rounds" in p.stderr and "must be >= 1" in p.stderr
    assert not out.exists()


def test_cli_help_lists_every_field():
    p = _cli("--help")
    assert p.returncode == 0
    for key in REQUIRED_KEYS:
        assert key in p.stdout, key
    assert "strategy.server_lr" in p.stdout


def test_cli_show_config_prints_resolved_yaml():
    p = _cli("--show-config", "run.rounds=3")
    assert p.returncode == 0, p.stderr
    assert "rounds: 3" in p.stdout and "name: pfedpg" in p.stdout


def test_every_shipped_config_is_valid():
    from pathlib import Path

    from fedpers.sweep.cli import load_grid

    files = sorted(Path(__file__).parents[1].joinpath("experiments", "configs").glob("*.yaml"))
    assert files
    for f in files:
        if f.name.startswith("benchmark"):  # sweep grids: every cell's config is validated instead
            assert load_grid(f)[1]
        else:
            load_config(f)


def test_default_yaml_is_the_default():
    from pathlib import Path

    f = Path(__file__).parents[1] / "experiments" / "configs" / "default.yaml"
    assert load_config(f) == load_config()


def test_config_reference_is_up_to_date():
    """docs/config.md documents every field; regenerate it with `python -m fedpers.docs`."""
    from fedpers.docs import field_rows, fields_markdown
    from fedpers.docs import CONFIG_DOC

    assert CONFIG_DOC.read_text() == fields_markdown(), "docs/config.md is stale: run python -m fedpers.docs"
    keys = {row[1] for row in field_rows()}
    assert {"run.seed", "data.partitioner.alpha", "model.num_prompts", "client.batch_size", "strategy.name"} <= keys
    assert all(row[4] for row in field_rows()), "every config field needs a # comment"


def test_docs_command_help_and_check_write_nothing(tmp_path, monkeypatch, capsys):
    from fedpers import docs

    target = tmp_path / "config.md"
    monkeypatch.setattr(docs, "CONFIG_DOC", target)
    with pytest.raises(SystemExit) as e:
        docs.main(["--help"])
    assert e.value.code == 0 and "--check" in capsys.readouterr().out
    assert not target.exists()
    assert docs.main(["--check"]) == 1 and not target.exists()  # missing = out of date, and still not written
    target.write_text("stale\n")
    assert docs.main(["--check"]) == 1 and target.read_text() == "stale\n"
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0


def test_an_unknown_strategy_field_suggests_the_close_one_and_lists_the_fields():
    from fedpers.experiment import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["strategy.lr=0.1"])
    assert e.value.field == "strategy.lr" and "'server_lr'" in str(e.value) and "server_optimizer" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["strategy.name=FedAvg"])
    assert "did you mean 'fedavg'" in str(e.value)


def test_client_optimizer_adamw_takes_adams_first_step_and_refuses_the_batched_trainer():
    import torch

    from fedpers.client import local_optimizer
    from fedpers.config import ClientConfig
    from fedpers.experiment import load_config

    for name in ("sgd", "adamw"):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        opt = local_optimizer([p], ClientConfig(optimizer=name, lr=0.1, weight_decay=0.0))
        (p * torch.tensor([10.0, 0.01, -1.0])).sum().backward()
        opt.step()
        step = torch.tensor([1.0, -2.0, 3.0]) - p.detach()
        if name == "adamw":  # Adam's first step is lr * sign(gradient), whatever the gradient's size
            assert torch.allclose(step, torch.tensor([0.1, 0.1, -0.1]), atol=1e-5)
        else:  # SGD's is lr * gradient
            assert torch.allclose(step, torch.tensor([1.0, 0.001, -0.1]), atol=1e-6)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["client.optimizer=adam"])
    assert e.value.field == "client.optimizer" and "adamw" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["client.optimizer=adamw", "run.batch_clients=true", "run.engine=fast"])
    assert e.value.field == "client.optimizer"


def test_adapter_auto_resolves_to_each_strategys_first_adapter_and_is_recorded():
    from fedpers.experiment import from_yaml, load_config

    from strategies import get_strategy_class

    base = ["model.modality=text", "model.backbone=all-MiniLM-L6-v2", "model.adapter=auto",
            "data.dataset=synthetic_text_small"]
    for name in ("pfedpg", "fedit", "local", "flora"):
        cfg = load_config(None, base + [f"strategy.name={name}"])
        assert cfg.model.adapter == get_strategy_class(name).adapters[0]
        assert from_yaml(to_yaml(cfg)).model.adapter == cfg.model.adapter  # config.yaml holds the resolved one
    assert load_config(None, ["model.adapter=auto"]).model.adapter == "prompt"  # vision


@pytest.mark.parametrize("strategy, adapter", [("pfedpg", "prompt"), ("local", "prompt"), ("fedavg", "prompt"),
                                               ("fedit", "lora"), ("zero_shot", None), ("in_context", None),
                                               ("pfedlora_gen", "lora"), ("hetlora", "lora")])
def test_llm_chitchat_takes_the_readme_strategy_overrides(strategy, adapter):
    """The shipped LLM config with `strategy.name=...`: model.adapter=auto gives prompt methods soft prompts
    and LoRA methods LoRA; an explicit mismatch is refused with the override to use."""
    from pathlib import Path

    f = Path(__file__).parents[1] / "experiments" / "configs" / "llm_chitchat.yaml"
    cfg = load_config(f, [f"strategy.name={strategy}"])
    if adapter is not None:
        assert cfg.model.adapter == adapter
        from strategies import get_strategy_class

        wrong = "lora" if adapter == "prompt" else "prompt"
        if wrong not in get_strategy_class(strategy).adapters:
            with pytest.raises(ConfigError, match=f"set model.adapter={adapter}"):
                load_config(f, [f"strategy.name={strategy}", f"model.adapter={wrong}"])
