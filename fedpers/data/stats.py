"""Heterogeneity statistics and the partition report (JSON, CSV, PNG) of a federation.

Label distributions are those clients actually train on (after any concept shift). Distances compare
each client's label distribution with the pooled one:

- Jensen-Shannon distance (base 2, in [0, 1]): 0 = same distribution, 1 = disjoint supports.
- EMD as in Zhao et al. 2018 ("Federated Learning with Non-IID Data"): sum_k |p_k - q_k|, in [0, 2]
  (the earth mover's distance under the 0/1 ground metric of unordered classes, times two).

Neither sees feature or concept shift under an IID label split; the ``shift`` section of the report
describes those (domains per client, label maps and how much clients disagree about labels).

Dialogue datasets (modality ``llm``) have no labels: their report counts examples and conversations per
client (clients.csv, examples_per_client.png) and sizes only in heterogeneity.json.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fedpers.data.partition import FederatedData


def heterogeneity(counts: np.ndarray) -> dict:
    """Summary of a (num_clients, num_classes) label histogram."""
    from scipy.spatial.distance import jensenshannon

    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    glob = counts.sum(axis=0) / counts.sum()
    local = counts / np.maximum(sizes[:, None], 1)
    js = np.array([jensenshannon(q, glob, base=2) for q in local])
    emd = np.abs(local - glob).sum(axis=1)
    return {
        "js_mean": float(js.mean()),
        "js_max": float(js.max()),
        "emd_mean": float(emd.mean()),
        "emd_max": float(emd.max()),
        "classes_per_client_mean": float((counts > 0).sum(axis=1).mean()),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(sizes.mean()),
        "size_cv": float(sizes.std() / sizes.mean()),  # quantity skew: coefficient of variation of sizes
        "per_client_js": js.round(6).tolist(),
        "per_client_emd": emd.round(6).tolist(),
    }


def concept_disagreement(shift_info: list[dict]) -> float | None:
    """Share of (client pair, class) combinations whose labels differ: 0 = one concept, ~1 = all differ."""
    maps = [np.asarray(i["label_map"]) for i in shift_info if "label_map" in i]
    if len(maps) < 2:
        return None
    pairs = [(a != b).mean() for i, a in enumerate(maps) for b in maps[i + 1:]]
    return float(np.mean(pairs))


def size_summary(sizes) -> dict:
    """Quantity skew of client sizes (train + test)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return {"size_min": int(sizes.min()), "size_max": int(sizes.max()), "size_mean": float(sizes.mean()),
            "size_cv": float(sizes.std() / sizes.mean())}


def dialogue_report(fed: FederatedData) -> dict:
    """Report of a dialogue federation: examples and conversations per client, no label statistics."""
    info = fed.client_info or [{} for _ in fed.clients]
    num_train = [c.num_train for c in fed.clients]
    num_test = [int(c.y_test.shape[0]) for c in fed.clients]
    return {
        "dataset": fed.dataset,
        "modality": fed.modality,
        "num_clients": len(fed.clients),
        "num_train": num_train,
        "num_test": num_test,
        # y is each example's conversation index
        "conversations_train": [len(np.unique(c.y_train.numpy())) for c in fed.clients],
        "conversations_test": [len(np.unique(c.y_test.numpy())) for c in fed.clients],
        "speakers": [i.get("speaker") for i in info],
        "examples_before_cap": [i.get("examples_before_cap", n) for i, n in zip(info, num_train)],
        "heterogeneity": size_summary([a + b for a, b in zip(num_train, num_test)]),
        "shift": {"per_client": fed.shift_info},
    }


def report(fed: FederatedData) -> dict:
    if fed.modality == "llm":
        return dialogue_report(fed)
    counts = fed.label_counts()
    shift = {"per_client": fed.shift_info}
    groups = {i.get("group") for i in fed.shift_info if "group" in i}
    if groups:
        shift["num_groups"] = len(groups)
    dis = concept_disagreement(fed.shift_info)
    if dis is not None:
        shift["label_disagreement"] = dis
    return {
        "dataset": fed.dataset,
        "num_clients": len(fed.clients),
        "num_classes": fed.num_classes,
        "num_train": [c.num_train for c in fed.clients],
        "num_test": [int(c.y_test.shape[0]) for c in fed.clients],
        "label_counts": counts.tolist(),
        "heterogeneity": heterogeneity(counts),
        "shift": shift,
    }


def label_partitioner(fed: FederatedData):
    """A flwr-datasets NaturalIdPartitioner over the final client labels, for flwr-datasets' plots
    (``plot_label_distributions``, ``plot_comparison_label_distribution``)."""
    from datasets import ClassLabel, Dataset, Features, Value
    from flwr_datasets.partitioner import NaturalIdPartitioner

    cid = np.concatenate([np.full(len(c.y_train) + len(c.y_test), i) for i, c in enumerate(fed.clients)])
    lab = np.concatenate([np.concatenate([c.y_train.numpy(), c.y_test.numpy()]) for c in fed.clients])
    part = NaturalIdPartitioner(partition_by="client")
    # Client ids are sorted integers, so flwr's partition id i is client i.
    # A ClassLabel column lets flwr-datasets name the labels (and keeps it from warning that it cannot).
    features = Features({"client": Value("int64"), "label": ClassLabel(num_classes=fed.num_classes)})
    part.dataset = Dataset.from_dict({"client": cid, "label": lab}, features=features)
    return part


REPORT_FILES = ("partitions.json", "heterogeneity.json", "label_counts.csv", "label_distribution.png",
                "label_heatmap.png", "domains.png", "clients.csv", "examples_per_client.png")


def write_report(fed: FederatedData, out: str | Path, setting: str | None = None, plots: bool = True) -> dict:
    """Write partitions.json, heterogeneity.json, label_counts.csv and PNG plots into ``out``, after
    removing every file an earlier report left there, so no stale plot sits beside new numbers.
    ``setting`` names the partition for plot titles (e.g. "dirichlet(alpha=0.1), seed 0")."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    rep = report(fed)
    (out / "partitions.json").write_text(json.dumps(rep, indent=1))
    if fed.modality == "llm":
        _write_dialogue_report(fed, out, setting, plots, rep)
        return rep
    summary = {k: v for k, v in rep["heterogeneity"].items() if not k.startswith("per_client")}
    if "label_disagreement" in rep["shift"]:
        summary["label_disagreement"] = rep["shift"]["label_disagreement"]
    (out / "heterogeneity.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    with (out / "label_counts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["client", "num_train", "num_test", "size", *[f"label_{k}" for k in range(fed.num_classes)]])
        for i, row in enumerate(rep["label_counts"]):
            w.writerow([i, rep["num_train"][i], rep["num_test"][i], sum(row), *row])
    if plots:
        plot_report(fed, out, report_title(fed, setting, summary), rep)
    return rep


DIALOGUE_COLUMNS = ("num_train", "num_test", "conversations_train", "conversations_test", "examples_before_cap")


def _write_dialogue_report(fed: FederatedData, out: Path, setting: str | None, plots: bool, rep: dict) -> None:
    """heterogeneity.json (sizes), clients.csv and examples_per_client.png of a dialogue federation."""
    (out / "heterogeneity.json").write_text(json.dumps(rep["heterogeneity"], indent=2, sort_keys=True))
    with (out / "clients.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["client", "speaker", *DIALOGUE_COLUMNS])
        for i in range(rep["num_clients"]):
            w.writerow([i, rep["speakers"][i], *[rep[k][i] for k in DIALOGUE_COLUMNS]])
    if not plots:
        return
    import matplotlib.pyplot as plt

    n = rep["num_clients"]
    tr, te = np.asarray(rep["num_train"]), np.asarray(rep["num_test"])
    het = rep["heterogeneity"]
    head = f"{fed.dataset}, {n} clients" + (f", {setting}" if setting else "")
    title = (f"{head}\nexamples per client: {het['size_min']}-{het['size_max']} (mean {het['size_mean']:.0f}, "
             f"coefficient of variation {het['size_cv']:.2f})")
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * min(n, 60)))
    ax.barh(np.arange(n), tr, color="#4C72B0", label="train")
    ax.barh(np.arange(n), te, left=tr, color="#DD8452", label="test")
    ax.set_yticks(np.arange(n), [f"client {i} (conversations: {a} train, {b} test)" for i, (a, b) in
                                  enumerate(zip(rep["conversations_train"], rep["conversations_test"]))],
                  fontsize=8 if n <= 30 else 4)
    ax.invert_yaxis()
    ax.set_xlabel("examples (a speaker's turns with context)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(out / "examples_per_client.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def client_labels(rep: dict) -> list[str]:
    """Axis labels naming every client with its test-split size (what its accuracy is measured on)."""
    return [f"client {i} (test {n})" for i, n in enumerate(rep["num_test"])]


def plot_report(fed: FederatedData, out: Path, title: str, rep: dict | None = None) -> None:
    """label_distribution.png (samples per label, stacked per client) and label_heatmap.png (each
    client's label shares, with a labelled colour bar); domains.png under domain shift."""
    # No matplotlib.use("Agg") here: it would switch a notebook's inline backend off. Matplotlib already
    # falls back to Agg where there is no display.
    import matplotlib.pyplot as plt

    from fedpers.results.plotting import categorical

    rep = rep or report(fed)
    counts = np.asarray(rep["label_counts"], dtype=float)
    n, k = counts.shape
    names = client_labels(rep)
    colours = categorical(k)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * n))
    left = np.zeros(n)
    for c in range(k):
        ax.barh(np.arange(n), counts[:, c], left=left, color=colours[c], label=str(c), edgecolor="white",
                linewidth=0.3)
        left += counts[:, c]
    ax.set_yticks(np.arange(n), names, fontsize=8 if n <= 30 else 5)
    ax.invert_yaxis()  # client 0 on top, as in the heat map and label_counts.csv
    ax.set_xlabel("samples (train + test)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="label", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=7, title_fontsize=8)
    fig.savefig(out / "label_distribution.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * k, 1.2 + 0.32 * n))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(np.arange(k), [str(c) for c in range(k)])
    ax.set_yticks(np.arange(n), names, fontsize=8 if n <= 30 else 5)
    ax.set_xlabel("label")
    ax.set_ylabel("client (test-split size)")
    ax.set_title(title, fontsize=9)
    if n * k <= 300:  # the numbers themselves, where they fit
        for i in range(n):
            for c in range(k):
                ax.text(c, i, f"{share[i, c]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if share[i, c] < 50 else "black")
    fig.colorbar(im, ax=ax, label="% of the client's samples")
    fig.savefig(out / "label_heatmap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    if any("domain" in i for i in fed.shift_info):
        fig = plot_domains(fed)
        fig.suptitle(title.split("\n")[0] + "\ntrain images per client (c<i> = client, y = label)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "domains.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def describe_setting(data_cfg, seed: int) -> str:
    """A partition setting in words for titles: "dirichlet(alpha=0.1), seed 0"."""
    p = data_cfg.partitioner
    param = {"dirichlet": f"alpha={p.alpha}", "inner_dirichlet": f"alpha={p.alpha}",
             "pathological": f"{p.num_classes_per_partition} classes/client",
             "shard": f"{p.num_shards_per_partition} shards/client"}.get(p.name)
    text = p.name + (f"({param})" if param else "")
    if data_cfg.shift.name != "none":
        text += f", {data_cfg.shift.name} shift"
    return f"{text}, seed {seed}"


def report_title(fed: FederatedData, setting: str | None, het: dict) -> str:
    """What a partition plot shows, with its two heterogeneity numbers spelled out."""
    head = f"{fed.dataset}, {len(fed.clients)} clients" + (f", {setting}" if setting else "")
    return (f"{head}\nto the pooled label distribution: mean Jensen-Shannon distance {het['js_mean']:.2f} "
            f"(0-1), mean EMD {het['emd_mean']:.2f} (0-2)")


def plot_domains(fed: FederatedData, per_client: int = 4, max_clients: int = 10):
    """A grid of train images: one row per client, so each client's domain is visible."""
    import matplotlib.pyplot as plt

    n = min(len(fed.clients), max_clients)
    fig, axes = plt.subplots(n, per_client, figsize=(1.3 * per_client + 2.6, 1.3 * n), squeeze=False)
    for i in range(n):
        x, y = fed.clients[i].x_train, fed.clients[i].y_train
        info = fed.shift_info[i] if i < len(fed.shift_info) else {}
        for j in range(per_client):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(x):
                img = x[j].permute(1, 2, 0).numpy()
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"c{i} y={int(y[j])}", fontsize=7)
        # each client's domain: its shift group and the transforms with their magnitudes
        axes[i, -1].text(1.08, 0.5, domain_label(info), transform=axes[i, -1].transAxes, fontsize=6,
                         va="center", ha="left")
    fig.tight_layout()
    return fig


def domain_label(info: dict) -> str:
    """'group g: rotate 12°, contrast x1.3, ...' for a client's domain shift (empty without one)."""
    if "domain" not in info:
        return ""
    parts = []
    for t, v in info["domain"].items():
        if t == "rotate":
            parts.append(f"rotate {v:+.0f}°")
        elif t == "invert":
            parts.append("inverted" if v else "not inverted")
        elif isinstance(v, list):
            parts.append(f"{t} x" + "/".join(f"{g:.2f}" for g in v))
        elif t in ("contrast", "color"):
            parts.append(f"{t} x{v:.2f}")
        else:
            parts.append(f"{t} {v:.2f}")
    return f"group {info.get('group')}:\n" + "\n".join(parts)
