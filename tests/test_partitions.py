"""Partitioning schemes, min-size policy, heterogeneity numbers and the partition report, on the digits data."""

import csv
import json

import numpy as np
import pytest

from fedpers.config import PARTITIONERS, ConfigError
from fedpers.data import DataError, build_federated
from fedpers.data.partition import _build_cached, enforce_min_size, required_size
from fedpers.data.schemes import list_schemes
from fedpers.data.stats import heterogeneity
from fedpers.experiment import load_config

NUM_DIGITS = 1348  # digits minus the backbone-pretraining hold-out


def fed_for(*overrides, clients=5, seed=0, fresh=False):
    cfg = load_config(None, [f"run.num_clients={clients}", f"run.clients_per_round={clients}",
                             f"run.seed={seed}", *overrides])
    if fresh:  # bypass the per-process cache so a rebuild really recomputes
        _build_cached.cache_clear()
    return build_federated(cfg.data, cfg.run.num_clients, cfg.run.seed)


def sizes(fed):
    return [c.num_train + len(c.y_test) for c in fed.clients]


# Parameters that make every scheme valid for 5 clients on digits; expected total number of samples.
SCHEME_CASES = {
    "iid": ([], NUM_DIGITS),
    "dirichlet": (["data.partitioner.alpha=0.5"], NUM_DIGITS),
    # 5 clients x 3 classes may leave classes unused (flwr-datasets warns); used classes are handed out whole
    "pathological": (["data.partitioner.num_classes_per_partition=3"], None),
    # 5 clients x 2 shards of floor(1348 / 10) samples; the 8 left over are dropped (keep_incomplete_shard=false)
    "shard": (["data.partitioner.num_shards_per_partition=2"], 1340),
    "inner_dirichlet": (["data.partitioner.alpha=0.5"], NUM_DIGITS),
    "size": (["data.partitioner.partition_sizes=[100,200,300,50,25]"], 675),
    "linear": ([], NUM_DIGITS),
    "square": ([], NUM_DIGITS),
    "exponential": ([], NUM_DIGITS),
}


def test_registry_matches_the_config_allow_list():
    assert list_schemes() == list(PARTITIONERS)


@pytest.mark.parametrize("name", [n for n in PARTITIONERS if n != "natural_id"])
def test_every_scheme_builds_and_sizes_add_up(name):
    extra, total = SCHEME_CASES[name]
    fed = fed_for(f"data.partitioner.name={name}", *extra)
    s = sizes(fed)
    assert len(s) == 5 and min(s) >= 2
    if total is None:
        per_class = fed_for("data.partitioner.name=iid").label_counts().sum(axis=0)
        total = int(per_class[fed.label_counts().sum(axis=0) > 0].sum())
    assert sum(s) == total
    assert fed.label_counts().sum() == total
    for c in fed.clients:
        assert len(c.y_test) >= 1 and c.num_train >= 1
        assert c.x_train.shape[0] == c.num_train


def test_quantity_skew_schemes_really_skew_sizes():
    assert sizes(fed_for("data.partitioner.name=size", *SCHEME_CASES["size"][0])) == [100, 200, 300, 50, 25]
    lin = sizes(fed_for("data.partitioner.name=linear"))
    sq = sizes(fed_for("data.partitioner.name=square"))
    ex = sizes(fed_for("data.partitioner.name=exponential"))
    for s in (lin, sq, ex):
        assert s == sorted(s) and s[-1] > 2 * s[0]
    assert sq[-1] / sq[0] > lin[-1] / lin[0]
    assert ex[-1] / ex[0] > sq[-1] / sq[0]


def test_pathological_clients_hold_exactly_their_classes():
    counts = fed_for("data.partitioner.name=pathological", "data.partitioner.num_classes_per_partition=3").label_counts()
    assert ((counts > 0).sum(axis=1) <= 3).all()


def test_seeds_reproduce_and_differ():
    a = fed_for("data.partitioner.name=dirichlet", "data.partitioner.alpha=0.3", seed=3, fresh=True)
    b = fed_for("data.partitioner.name=dirichlet", "data.partitioner.alpha=0.3", seed=3, fresh=True)
    c = fed_for("data.partitioner.name=dirichlet", "data.partitioner.alpha=0.3", seed=4, fresh=True)
    assert a is not b
    assert (a.label_counts() == b.label_counts()).all()
    for ca, cb in zip(a.clients, b.clients):
        assert (ca.x_train == cb.x_train).all() and (ca.y_test == cb.y_test).all()
    assert (a.label_counts() != c.label_counts()).any()


def test_heterogeneity_orders_dirichlet_alphas_and_iid():
    def het(*o):
        return heterogeneity(fed_for(*o, clients=10).label_counts())

    d01 = het("data.partitioner.name=dirichlet", "data.partitioner.alpha=0.1")
    d10 = het("data.partitioner.name=dirichlet", "data.partitioner.alpha=10")
    iid = het("data.partitioner.name=iid")
    assert d01["js_mean"] > d10["js_mean"] > iid["js_mean"]
    assert d01["emd_mean"] > d10["emd_mean"] > iid["emd_mean"]
    assert d01["js_mean"] > 0.4 and iid["js_mean"] < 0.1


def test_heterogeneity_extremes():
    same = heterogeneity(np.array([[5, 5], [10, 10]]))
    assert same["js_mean"] == pytest.approx(0) and same["emd_mean"] == pytest.approx(0)
    disjoint = heterogeneity(np.array([[10, 0], [0, 10]]))
    # each client vs the pooled (0.5, 0.5): EMD = 1, JS distance = sqrt(1 - 0.5 * ... ) known value
    assert disjoint["emd_mean"] == pytest.approx(1.0)
    assert 0.5 < disjoint["js_mean"] < 1.0
    assert disjoint["size_cv"] == pytest.approx(0)


@pytest.mark.parametrize("override, field, match", [
    ("data.partitioner.alpha=0", "data.partitioner.alpha", "must be > 0"),
    ("data.partitioner.alpha=-1", "data.partitioner.alpha", "must be > 0"),
    ("data.partitioner.name=zipf", "data.partitioner.name", "allowed: iid, dirichlet, pathological, shard"),
    ("data.shift.name=style", "data.shift.name", "allowed: none, domain, concept"),
    ("data.small_client_policy=ignore", "data.small_client_policy", "allowed: error, rebalance"),
    ("data.min_client_size=0", "data.min_client_size", ">= 1"),
])
def test_bad_values_name_field_and_allowed_values(override, field, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [override])
    assert e.value.field == field


@pytest.mark.parametrize("overrides, field, match", [
    (["data.partitioner.name=pathological", "data.partitioner.num_classes_per_partition=11"],
     "data.partitioner.num_classes_per_partition", r"\[1, 10\].*10 classes"),
    (["data.partitioner.name=pathological", "data.partitioner.class_assignment_mode=greedy"],
     "data.partitioner.class_assignment_mode", "allowed: first-deterministic, random, deterministic"),
    (["data.partitioner.name=inner_dirichlet", "data.partitioner.alpha=0"], "data.partitioner.alpha", "> 0"),
    (["data.partitioner.name=size", "data.partitioner.partition_sizes=[1,2]"],
     "data.partitioner.partition_sizes", "run.num_clients=10"),
    (["data.partitioner.name=shard", "data.partitioner.num_shards_per_partition=null"],
     "data.partitioner.num_shards_per_partition", "shard_size"),
    (["data.shift.name=domain", "data.shift.transforms=[rotate,sepia]"], "data.shift.transforms", "sepia"),
    (["data.shift.name=domain", "data.shift.strength=-1"], "data.shift.strength", ">= 0"),
    (["data.shift.name=concept", "data.shift.concept_mode=group", "data.shift.num_label_groups=10"],
     "data.shift.num_label_groups", r"\[2, 9\]"),
    (["data.shift.name=concept", "data.shift.concept_mode=swap"], "data.shift.concept_mode", "permute, group"),
])
def test_scheme_specific_errors(overrides, field, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, overrides)
    assert e.value.field == field


def test_only_the_chosen_schemes_fields_are_checked():
    # alpha is a dirichlet knob: an out-of-range value is irrelevant to iid
    assert load_config(None, ["data.partitioner.name=iid", "data.partitioner.alpha=0"]).data.partitioner.alpha == 0


def test_impossible_partition_is_a_data_error():
    with pytest.raises(DataError, match="exponential"):
        fed_for("data.partitioner.name=exponential", clients=10)  # e^1 / sum e^i of 1348 samples rounds to 0
    with pytest.raises(DataError, match="greater than"):
        fed_for("data.partitioner.name=size", "data.partitioner.partition_sizes=[1000,1000,1,1,1]")


def test_small_clients_fail_clearly_by_default():
    # square: client 0 gets 1/385 of the data (3 samples)
    with pytest.raises(DataError, match="data.small_client_policy=rebalance") as e:
        fed_for("data.partitioner.name=square", "data.min_client_size=20", clients=10)
    assert "client 0: 3" in str(e.value)


def test_rebalance_moves_samples_so_every_client_is_big_enough():
    fed = fed_for("data.partitioner.name=square", "data.min_client_size=20", "data.small_client_policy=rebalance",
                  clients=10)
    s = sizes(fed)
    assert min(s) >= 20 and sum(s) == NUM_DIGITS
    assert fed.shift_info[0]["rebalanced_in"] == 17


def test_rebalance_never_duplicates_or_loses_samples():
    from fedpers.config import DataConfig

    data = DataConfig(min_client_size=5, small_client_policy="rebalance")
    parts = [np.arange(0, 2), np.arange(2, 40), np.arange(40, 41), np.arange(41, 60)]
    new, moved = enforce_min_size(parts, data, seed=0)
    assert moved == {0: 3, 2: 4}
    allrows = np.concatenate(new)
    assert sorted(allrows.tolist()) == list(range(60))
    assert min(len(p) for p in new) >= required_size(data) == 5


def test_missing_test_split_fails_with_the_field_names():
    with pytest.raises(DataError, match="data.min_test_size=30"):
        fed_for("data.partitioner.name=iid", "data.min_test_size=30", clients=10)


@pytest.fixture(scope="module")
def domain_dataset(tmp_path_factory):
    """A tiny dataset with a real 'domain' column, saved like a hub download (3 domains, distinct brightness)."""
    from datasets import Dataset

    rng = np.random.default_rng(0)
    domains = np.repeat(["art", "photo", "sketch"], 16)
    labels = np.tile(np.arange(4), 12)
    level = {"art": 0.2, "photo": 0.5, "sketch": 0.8}
    imgs = [np.full((4, 4, 3), level[d], np.float32) + rng.normal(0, 0.01, (4, 4, 3)).astype(np.float32)
            for d in domains]
    path = tmp_path_factory.mktemp("dom") / "ds"
    Dataset.from_dict({"img": imgs, "label": labels.tolist(), "domain": domains.tolist()}).save_to_disk(str(path))
    return path


def test_natural_id_splits_a_dataset_by_its_real_domains(domain_dataset, capfd):
    fed = fed_for("data.dataset=cifar10", f"data.path={domain_dataset}", "data.partitioner.name=natural_id",
                  "data.partitioner.id_column=domain", clients=3)
    assert "partition_id_to_indices" not in capfd.readouterr().err  # flwr-datasets' own bar stays off
    assert sizes(fed) == [16, 16, 16]
    for c, level in zip(fed.clients, (0.2, 0.5, 0.8)):  # sorted domain names -> client ids
        x = np.concatenate([c.x_train.numpy(), c.x_test.numpy()])
        assert np.abs(x - level).max() < 0.1


def test_natural_id_errors_name_the_fix(domain_dataset):
    base = ["data.dataset=cifar10", f"data.path={domain_dataset}", "data.partitioner.name=natural_id"]
    with pytest.raises(DataError, match="run.num_clients=3"):
        fed_for(*base, "data.partitioner.id_column=domain", clients=4)
    with pytest.raises(DataError, match="no such column.*domain"):
        fed_for(*base, "data.partitioner.id_column=writer", clients=3)


def test_partitions_cli_writes_histograms_summary_and_plots(tmp_path, capsys):
    from fedpers import partitions

    out = tmp_path / "p"
    assert partitions.main(["--out", str(out), "run.num_clients=4", "run.clients_per_round=4",
                            "data.partitioner.name=dirichlet", "data.partitioner.alpha=0.3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for name in ("partitions.json", "heterogeneity.json", "label_counts.csv", "label_distribution.png",
                 "label_heatmap.png"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "partitions.json").read_text())
    with (out / "label_counts.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["size"]) for r in rows] == [sum(c) for c in rep["label_counts"]] == printed["sizes"]
    assert sum(printed["sizes"]) == NUM_DIGITS
    het = json.loads((out / "heterogeneity.json").read_text())
    assert het["js_mean"] == pytest.approx(heterogeneity(np.array(rep["label_counts"]))["js_mean"])


def test_partitions_cli_never_writes_into_a_run_folder_and_leaves_no_stale_files(tmp_path, capsys, monkeypatch):
    from fedpers import partitions

    monkeypatch.chdir(tmp_path)
    base = ["run.num_clients=4", "run.clients_per_round=4"]
    # A finished run's folder (as simulate writes it) keeps its own partition record untouched.
    run = tmp_path / "results" / "default"
    (run / "partitions").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "partitions" / "partitions.json").write_text("the run's record")
    for target in (run, run / "partitions"):
        assert partitions.main(["--out", str(target), *base]) == 2
        assert "holds a simulation run" in capsys.readouterr().err
    assert partitions.main(base) == 0  # the default folder is its own, not run.output_dir's
    assert json.loads(capsys.readouterr().out)["output"] == partitions.DEFAULT_OUT
    assert (run / "partitions" / "partitions.json").read_text() == "the run's record"
    own = tmp_path / partitions.DEFAULT_OUT
    assert (own / "label_heatmap.png").is_file()
    # A second preview without plots: the first one's PNGs must not sit beside the new numbers.
    assert partitions.main([*base, "--no-plots", "data.partitioner.alpha=5"]) == 0
    assert (own / "partitions.json").is_file() and not list(own.glob("*.png"))


def test_partitions_cli_resolves_dotdot_and_symlinks_before_its_guard(tmp_path, capsys):
    from fedpers import partitions

    run = tmp_path / "run"
    (run / "partitions").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    record = {"partitions.json": "the run's record", "label_heatmap.png": "the run's plot"}
    for name, text in record.items():
        (run / "partitions" / name).write_text(text)
    link = tmp_path / "link"
    link.symlink_to(run / "partitions")
    # Both spell the run's own partitions folder: "x" does not exist yet, the link points there.
    for target in (run / "partitions" / "x" / "..", link, tmp_path / "link2" / ".." / "run"):
        assert partitions.main(["--out", str(target), "--no-plots", "run.num_clients=4",
                                "run.clients_per_round=4"]) == 2, target
        assert "holds a simulation run" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in (run / "partitions").iterdir()} == record
    assert not (run / "partitions" / "x").exists() and not (tmp_path / "link2").exists()


def test_partitions_cli_reports_bad_config(capsys):
    from fedpers import partitions

    assert partitions.main(["data.partitioner.alpha=0"]) == 2
    assert "data.partitioner.alpha" in capsys.readouterr().err


def test_every_simulation_saves_its_partition_report(tmp_path):
    from fedpers import simulate
    from tests.conftest import tiny_overrides

    out = tmp_path / "run"
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 1, "data.shift.name": "domain"})) == 0
    het = json.loads((out / "partitions" / "heterogeneity.json").read_text())
    rep = json.loads((out / "partitions" / "partitions.json").read_text())
    assert rep["num_clients"] == 3 and len(rep["shift"]["per_client"]) == 3
    assert "domain" in rep["shift"]["per_client"][0]
    # the heterogeneity figures, recomputed from the saved label counts: each client's counts add up to its
    # split sizes, and the JS distance (base 2) of its label shares to the pooled ones averages to js_mean
    counts = np.array(rep["label_counts"], dtype=float)
    assert counts.sum(axis=1).tolist() == [a + b for a, b in zip(rep["num_train"], rep["num_test"])]
    pooled = counts.sum(axis=0) / counts.sum()

    def kl(p, q):
        return sum(a * np.log2(a / b) for a, b in zip(p, q) if a > 0)

    shares = counts / counts.sum(axis=1, keepdims=True)
    js = [np.sqrt((kl(q, (q + pooled) / 2) + kl(pooled, (q + pooled) / 2)) / 2) for q in shares]
    assert rep["heterogeneity"]["per_client_js"] == pytest.approx(js, abs=1e-6)
    assert het["js_mean"] == rep["heterogeneity"]["js_mean"] == pytest.approx(np.mean(js))
    assert (out / "partitions" / "domains.png").is_file() and (out / "summary.json").is_file()


def test_new_data_fields_survive_the_yaml_round_trip_flower_clients_use():
    from fedpers.config import to_yaml
    from fedpers.experiment import from_yaml

    cfg = load_config(None, ["data.partitioner.name=size", "data.partitioner.partition_sizes=[5,6,7,8,9,10,11,12,13,14]",
                             "data.shift.name=domain", "data.shift.transforms=[blur,invert]",
                             "data.small_client_policy=rebalance"])
    again = from_yaml(to_yaml(cfg))
    assert again == cfg and again.data.partitioner.partition_sizes[0] == 5
