"""A device's own data folder (the three documented layouts), the partition exporter, the run-config
mapping used by ``flwr run``, and the launcher's argument building. No network, no Flower processes."""

import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from fedpers.config import ConfigError, DataConfig

from fedpers.experiment import load_config
from fedpers.data import DataError, build_federated
from fedpers.data.local import load_device_data
from fedpers.export_partitions import export
from fedpers.export_partitions import main as export_main
from fedpers.flower.apps import config_from_run_config
from fedpers.flower.launch import run_config_arg
from tests.conftest import tiny_overrides


def test_exported_partitions_load_back_identical(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "o"))
    folders = export(cfg, tmp_path / "parts")
    assert [f.name for f in folders] == ["client_0", "client_1", "client_2"]
    fed = build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)
    for pid, folder in enumerate(folders):
        got = load_device_data(str(folder), cfg.data, pid, cfg.run.seed)
        want = fed.clients[pid]
        for name in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (pid, name)


def test_export_cli_rejects_bad_config(tmp_path, capsys):
    assert export_main([str(tmp_path / "x"), "run.num_clients=0"]) == 2
    assert "run.num_clients" in capsys.readouterr().err


def _png(path, value, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_image_folder_with_train_test_and_resizing(tmp_path):
    root = tmp_path / "dev"
    for split, n in (("train", 3), ("test", 2)):
        for label in (0, 7):
            for i in range(n):
                _png(root / split / str(label) / f"{i}.png", 255 if label == 7 else 0, size=(16, 12))
    d = load_device_data(str(root), DataConfig(), 0, 0)
    assert tuple(d.x_train.shape) == (6, 1, 8, 8) and tuple(d.x_test.shape) == (4, 1, 8, 8)  # digits shape
    assert sorted(d.y_train.tolist()) == [0, 0, 0, 7, 7, 7]
    assert float(d.x_train[d.y_train == 7].min()) == pytest.approx(1.0)


def test_flat_image_folder_is_split_with_test_fraction(tmp_path):
    root = tmp_path / "flat"
    for i in range(10):
        _png(root / str(i % 2) / f"{i}.png", 20 * i)
    d = load_device_data(str(root), DataConfig(test_fraction=0.2), 3, 0)
    assert (len(d.y_train), len(d.y_test)) == (8, 2)


def test_single_saved_dataset_with_pil_images(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    imgs = [Image.fromarray(np.full((8, 8), 10 * i, np.uint8)) for i in range(10)]
    ds = Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(10)]},
                           features=Features({"image": HFImage(), "label": Value("int64")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    d = load_device_data(str(tmp_path / "saved"), DataConfig(test_fraction=0.3), 0, 0)
    assert (len(d.y_train), len(d.y_test)) == (7, 3)
    assert d.x_train.dtype == torch.float32 and float(d.x_train.max()) <= 1.0


@pytest.mark.parametrize("layout, message", [
    ("missing", "not a directory"),
    ("bad_label_dir", "integer label ids"),
    ("label_out_of_range", r"outside \[0, 10\)"),
    ("empty", "no images"),
])
def test_bad_device_folders_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / layout
    if layout == "bad_label_dir":
        _png(root / "cat" / "0.png", 0)
    elif layout == "label_out_of_range":
        for i in range(5):
            _png(root / "12" / f"{i}.png", 0)
    elif layout == "empty":
        root.mkdir()
    with pytest.raises(DataError, match=message):
        load_device_data(str(root), DataConfig(), 0, 0)


def test_run_config_keys_map_to_config_fields():
    cfg = config_from_run_config({"config": "experiments/configs/fedvpt.yaml",
                                  "overrides": "run.rounds=3 run.num_clients=4 run.clients_per_round=2"})
    assert (cfg.strategy.name, cfg.run.rounds, cfg.run.num_clients) == ("fedvpt", 3, 4)
    with pytest.raises(ConfigError, match="run.rounds"):
        config_from_run_config({"config": "", "overrides": "run.rounds=0"})
    with pytest.raises(ConfigError, match="overrides"):
        config_from_run_config({"overrides": "run.rounds"})


def test_launcher_builds_one_toml_run_config():
    import tomllib

    arg = run_config_arg("experiments/configs/default.yaml", ["run.rounds=2", "run.output_dir=/tmp/a b"])
    parsed = tomllib.loads(arg.replace('" overrides', '"\noverrides'))
    assert parsed["config"] == "experiments/configs/default.yaml"
    assert shlex.split(parsed["overrides"]) == ["run.rounds=2", "run.output_dir=/tmp/a b"]


def test_bad_device_folder_is_named_when_the_node_starts(tmp_path):
    """A non-image file with an image suffix, or a partial save_to_disk copy: one DataError naming
    the file or folder from the node's discovery check (not a raw PIL/OSError in every round)."""
    from fedpers.data.local import check_device_folder

    for name in ("good", "bad"):
        for i in range(4):
            _png(tmp_path / name / str(i % 2) / f"{i}.png", 10 * i)
    check_device_folder(str(tmp_path / "good"))
    (tmp_path / "bad" / "1" / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="notes.png"):
        check_device_folder(str(tmp_path / "bad"))

    cfg = load_config(None, tiny_overrides(tmp_path / "o"))
    (folder, *_) = export(cfg, tmp_path / "parts")
    arrow = sorted(folder.rglob("*.arrow"))
    assert arrow, "the export writes arrow files"
    arrow[0].unlink()  # an interrupted copy
    with pytest.raises(DataError, match="partial copy"):
        check_device_folder(str(folder))
