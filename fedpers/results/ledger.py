"""Per-round ledger and the results folder: config.yaml, metrics.jsonl, summary.json, PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from fedpers.config import ExperimentConfig, to_yaml
from fedpers.payload import TIMED_OUT_KINDS, Failure, Reply, serialized_nbytes
from fedpers.results.validation import ValidationTrack


def worst_fraction_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the lowest ``fraction`` of values (at least one value)."""
    if not values:
        return float("nan")
    k = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(sorted(values)[:k]))


def weighted_accuracy(acc: dict[int, float], num_test: dict[int, float]) -> float:
    """Sample-weighted accuracy: sum over clients of accuracy x test samples / total test samples (the
    figure PFLlib's server reports), beside the unweighted client mean ``accuracy_mean``."""
    n = np.array([num_test.get(k, 0.0) for k in acc], dtype=np.float64)
    if not acc or n.sum() <= 0:
        return float("nan")
    return float(np.dot(np.array(list(acc.values()), dtype=np.float64), n) / n.sum())


def _stats(acc: dict[int, float]) -> dict[str, float]:
    vals = list(acc.values())
    if not vals:
        return {"accuracy_mean": float("nan"), "accuracy_std": float("nan"), "accuracy_worst10": float("nan")}
    return {
        "accuracy_mean": float(np.mean(vals)),
        "accuracy_std": float(np.std(vals)),
        "accuracy_worst10": worst_fraction_mean(vals),
    }


def perplexity_stats(loss: dict[int, float]) -> dict[str, float]:
    """Per-client perplexities ``exp(mean NLL per reply token)``: their mean, and the mean of the worst
    10% (the highest perplexities), as accuracy's worst-10% takes the lowest accuracies."""
    ppl = [math.exp(v) for v in loss.values() if math.isfinite(v)]
    if not ppl:
        return {"perplexity_mean": float("nan"), "perplexity_worst10": float("nan")}
    return {"perplexity_mean": float(np.mean(ppl)), "perplexity_worst10": -worst_fraction_mean([-p for p in ppl])}


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


CLIENT_EXTRAS = ("local_steps", "alpha", "rank")
VAL_EXTRAS = ("val_accuracy", "val_loss")  # data.val_fraction > 0


def _steps(ok: list[Reply]) -> dict | None:
    """Local optimizer steps per client this round (None when no reply reported them)."""
    steps = [float(u.metrics["local_steps"]) for u in ok if "local_steps" in u.metrics]
    return {"mean": float(np.mean(steps)), "min": min(steps), "max": max(steps)} if steps else None


def _lean(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "clients"}


def _steps_summary(per_round: list[dict | None]) -> dict | None:
    rounds = [r for r in per_round if r]
    if not rounds:
        return None
    return {"per_client_round": float(np.mean([r["mean"] for r in rounds])),
            "min": min(r["min"] for r in rounds), "max": max(r["max"] for r in rounds)}


class Ledger:
    def __init__(self, cfg: ExperimentConfig, strategy, resume: dict | None = None):
        """``resume``: a :meth:`state_dict` from a checkpoint; its rows replace metrics.jsonl, so rows
        written after that checkpoint by the interrupted run are dropped, not duplicated."""
        self.cfg = cfg
        self.strategy_name = cfg.strategy.name
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(cfg))
        self.metrics_path = self.out / "metrics.jsonl"
        rows = (resume or {}).get("rows", [])
        self.last_acc: dict[int, float] = {int(k): v for k, v in (resume or {}).get("last_acc", {}).items()}
        # each client's last test loss: an LLM client's mean NLL per reply token (its perplexity is exp)
        self.last_loss: dict[int, float] = {int(k): v for k, v in (resume or {}).get("last_loss", {}).items()}
        # each client's test-split size at its last evaluation: the sample-weighted accuracy's weights
        self.last_num_test: dict[int, float] = {int(k): v for k, v in (resume or {}).get("last_num_test", {}).items()}
        self.val = ValidationTrack(cfg.model.modality == "llm", resume)  # data.val_fraction > 0
        self.metrics_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        # metrics.jsonl is the full record; memory keeps each round without its per-client metrics, so a
        # run with many clients does not grow by a dict per client per round.
        self.rows: list[dict] = [_lean(r) for r in rows]
        self.unseen: dict | None = None
        self.cross_eval: dict | None = None
        self.params_down = sum(int(np.prod(s)) for k, s in strategy.shapes.items() if k in strategy.sends)
        self.params_up = sum(int(np.prod(s)) for s in strategy.reply_spec().values())
        # Wall time keeps counting across a resume.
        self.t0 = time.perf_counter() - (self.rows[-1]["wall_time_s"] if self.rows else 0.0)
        self.tb = None
        if cfg.run.tensorboard:
            from fedpers.results.tracking import TensorBoardLog

            self.tb = TensorBoardLog(self.out, first_round=len(rows) + 1)

    def state_dict(self) -> dict:
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
        return {"rows": rows, "last_acc": {str(k): v for k, v in self.last_acc.items()},
                "last_loss": {str(k): v for k, v in self.last_loss.items()},
                "last_num_test": {str(k): v for k, v in self.last_num_test.items()}, **self.val.state_dict()}

    def record_round(self, server_round: int, *, sampled: list[int], ok: list[Reply], failed: list[Failure],
                     applied: bool, bytes_down: dict[int, int], server_metrics: dict, seconds: float,
                     rejected: dict | None = None) -> dict:
        """``rejected``: why an aggregate was rolled back and by whose updates (None when it was not)."""
        acc = {u.partition_id: float(u.metrics["test_accuracy"]) for u in ok}
        self.last_acc.update(acc)
        self.last_loss.update({u.partition_id: float(u.metrics["test_loss"]) for u in ok})
        n_test = {u.partition_id: float(u.metrics.get("num_test", 0.0)) for u in ok}
        self.last_num_test.update(n_test)
        up = [serialized_nbytes(u.arrays) for u in ok]
        timed_out = [f for f in failed if f.kind in TIMED_OUT_KINDS]
        if len(ok) + len(failed) != len(sampled):
            raise AssertionError(f"round {server_round}: {len(ok)} ok + {len(failed)} failed != {len(sampled)} sampled")
        row = {
            "round": server_round,
            "sampled": sampled,
            "num_ok": len(ok),
            # sampled = num_ok + num_failed + num_timed_out: failed = raised or rejected, timed out = no answer
            "num_failed": len(failed) - len(timed_out),
            "num_timed_out": len(timed_out),
            "failures": [{"partition_id": f.partition_id, "kind": f.kind, "code": f.code, "reason": f.reason}
                         for f in failed],
            "applied": applied,
            "rejected": rejected,
            "clients": {
                str(u.partition_id): {
                    "accuracy": u.metrics["test_accuracy"],
                    "test_loss": u.metrics["test_loss"],
                    "train_loss": u.metrics["train_loss"],
                    "num_examples": int(u.num_examples),
                    # strategy-reported per-client numbers: local_steps (every strategy), alpha (apfl), rank (hetlora)
                    **{k: float(u.metrics[k]) for k in CLIENT_EXTRAS + VAL_EXTRAS if k in u.metrics},
                }
                for u in ok
            },
            **_stats(acc),
            # sum of correct / sum of test samples over this round's clients (PFLlib's server figure)
            "accuracy_weighted": weighted_accuracy(acc, n_test),
            "test_loss_mean": float(np.mean([float(u.metrics["test_loss"]) for u in ok])) if ok else float("nan"),
            "local_steps": _steps(ok),
            **self.val.round_fields(ok, self.last_acc, self.last_loss),  # data.val_fraction > 0
            "bytes_up": int(sum(up)),
            "bytes_down": int(sum(bytes_down.values())),
            "bytes_up_per_client": float(np.mean(up)) if up else 0.0,
            "bytes_down_per_client": float(np.mean(list(bytes_down.values()))) if bytes_down else 0.0,
            "server": server_metrics,
            "round_time_s": seconds,
            "wall_time_s": time.perf_counter() - self.t0,
        }
        self.rows.append(_lean(row))
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.tb is not None:
            self.tb.round(row)
        return row

    def record_unseen(self, result: dict) -> None:
        """Held-out clients' accuracies after personalizing from the trained server state."""
        self.unseen = result

    def record_cross_eval(self, result: dict) -> None:
        """Summary of the cross-evaluation (``fedpers.results.cross_eval.summarize``)."""
        self.cross_eval = result

    def finish(self, extra: dict | None = None) -> dict:
        """Write summary.json (plus ``extra`` entries, e.g. the privacy report), rounds.csv and plots.

        The final accuracies are over the training clients with at least one accepted reply, each at its
        last one: a client never sampled, or whose every reply failed, has no personal model to score.
        ``final.num_clients_evaluated`` says how many clients the means cover and
        ``final.clients_never_evaluated`` lists the others, so a mean over fewer clients is never silent."""
        from fedpers.experiment import split_clients

        final = _stats(self.last_acc)
        final["accuracy_weighted"] = weighted_accuracy(self.last_acc, self.last_num_test)
        never = sorted(set(split_clients(self.cfg.run)[0]) - set(self.last_acc))
        final["num_clients_evaluated"] = len(self.last_acc)
        final["clients_never_evaluated"] = never
        if never:
            logging.getLogger("fedpers").warning(
                "final accuracies cover %d training clients; %d never had an accepted reply and are not in "
                "them: %s", len(self.last_acc), len(never), never)
        unseen_acc = self.unseen["per_client"] if self.unseen else {}
        u = _stats(unseen_acc)
        # None (JSON null) when no client was held out, so "not measured" is never mistaken for a value.
        final["unseen_accuracy_mean"] = u["accuracy_mean"] if unseen_acc else None
        final["unseen_accuracy_worst10"] = u["accuracy_worst10"] if unseen_acc else None
        if self.cross_eval is not None:
            final["cross_eval"] = self.cross_eval
        if self.cfg.model.modality == "llm":
            final.update(perplexity_stats(self.last_loss))
            # each trained client's last mean NLL per reply token (perplexity = exp): the sweep's per-client
            # perplexity statistics read it (the held-out clients' is unseen.per_client_loss)
            final["per_client_loss"] = {str(k): v for k, v in sorted(self.last_loss.items())}
            unseen_loss = (self.unseen or {}).get("per_client_loss") or {}
            pu = perplexity_stats({int(k): v for k, v in unseen_loss.items()})
            final["unseen_perplexity_mean"] = pu["perplexity_mean"] if unseen_loss else None
            final["unseen_perplexity_worst10"] = pu["perplexity_worst10"] if unseen_loss else None
        summary = {
            "strategy": self.strategy_name,
            "rounds": len(self.rows),
            "num_clients": self.cfg.run.num_clients,
            "seed": self.cfg.run.seed,
            "dataset": self.cfg.data.dataset,
            "partitioner": self.cfg.data.partitioner.name,
            "final": {**final, "per_client": {str(k): v for k, v in sorted(self.last_acc.items())}},
            "bytes": {
                "up_per_client_round": float(np.mean([r["bytes_up_per_client"] for r in self.rows])),
                "down_per_client_round": float(np.mean([r["bytes_down_per_client"] for r in self.rows])),
                "total_up": int(sum(r["bytes_up"] for r in self.rows)),
                "total_down": int(sum(r["bytes_down"] for r in self.rows)),
            },
            "params": {"down_per_client_round": self.params_down, "up_per_client_round": self.params_up},
            # local compute: optimizer steps per client per round (mean over rounds of the per-round mean; min
            # and max over every client and round), so tables can show every strategy's budget
            "local_steps": _steps_summary([r.get("local_steps") for r in self.rows]),
            "unseen": None if self.unseen is None else {
                "partition_ids": self.unseen["partition_ids"],
                "per_client": {str(k): v for k, v in sorted(unseen_acc.items())},
                "failures": self.unseen["failures"],
                # LLM runs: the held-out clients' mean NLL per reply token, read by the sweep's CIs
                **({"per_client_loss": {str(k): v for k, v in sorted(
                    (int(k), v) for k, v in (self.unseen.get("per_client_loss") or {}).items())}}
                   if self.cfg.model.modality == "llm" else {}),
            },
            "failures": int(sum(r["num_failed"] + r["num_timed_out"] for r in self.rows)),
            "timed_out": int(sum(r["num_timed_out"] for r in self.rows)),
            "skipped_rounds": [r["round"] for r in self.rows if not r["applied"]],
            "rounds_applied": sum(1 for r in self.rows if r["applied"]),
            "rolled_back_rounds": [r["round"] for r in self.rows if r.get("rejected")],
            "wall_time_s": time.perf_counter() - self.t0,
            # data.val_fraction > 0: the validation-best round and the test figures there and at the last round
            "validation": self.val.summary(self.rows),
            **(extra or {}),
        }
        write_json_atomic(self.out / "summary.json", summary)
        self._write_csv()
        from fedpers.data.stats import describe_setting

        plot_results(self.rows, summary, self.out, describe_setting(self.cfg.data, self.cfg.run.seed))
        if self.tb is not None:
            self.tb.finish(self.out, len(self.rows))
        return summary

    def _write_csv(self) -> None:
        cols = ["round", "accuracy_mean", "accuracy_std", "accuracy_worst10", "accuracy_weighted", "test_loss_mean",
                *(["val_accuracy_mean", "val_loss_mean"] if any("val_accuracy_mean" in r for r in self.rows) else []),
                "num_ok", "num_failed", "num_timed_out", "applied", "bytes_up", "bytes_down", "round_time_s"]
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in self.rows]
        (self.out / "rounds.csv").write_text("\n".join(lines) + "\n")


def _test_sizes(out: Path) -> dict[str, int]:
    """Each client's test-split size, from the partition report the run wrote (absent in deployments,
    where each device holds its own data: then the plot shows accuracies without sizes)."""
    try:
        num_test = json.loads((out / "partitions" / "partitions.json").read_text())["num_test"]
    except (OSError, ValueError, KeyError):
        return {}
    return {str(i): int(n) for i, n in enumerate(num_test)}


def plot_results(rows: list[dict], summary: dict, out: Path, setting: str | None = None) -> None:
    """accuracy_per_round.png and accuracy_per_client.png; accuracy axes run from 0 to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpers.results.plotting import TOL_MUTED, integer_ticks, wilson

    setting = setting or f"{summary['partitioner']}, seed {summary.get('seed')}"
    title = f"{summary['strategy']} on {summary['dataset']}, {setting}"
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(rounds, [r["accuracy_mean"] for r in rows], marker="o", color=TOL_MUTED[0], label="mean over clients")
    n_clients = len(summary["final"]["per_client"])
    k = max(1, math.ceil(0.1 * n_clients))  # worst_fraction_mean's tail
    ax.plot(rounds, [r["accuracy_worst10"] for r in rows], marker=".", linestyle="--", color=TOL_MUTED[6],
            label=f"worst 10% of clients ({k} of {n_clients}: the mean of the lowest {k})" if k > 1
            else f"worst 10% of clients (1 of {n_clients}: the lowest client)")
    integer_ticks(ax.xaxis)
    ax.set_xlabel("round")
    ax.set_ylabel("personalized test accuracy (axis from 0)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=120)
    plt.close(fig)

    per_client = summary["final"]["per_client"]
    sizes = _test_sizes(out)
    ids = list(per_client)
    acc = np.array([per_client[k] for k in ids])
    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * len(ids) + 2), 4.2))
    x = np.arange(len(ids))
    ax.bar(x, acc, color=TOL_MUTED[1], edgecolor=TOL_MUTED[0])
    if sizes and ids:  # a 1.0 on 5 test images is not a 1.0 on 200: show how sure each bar is
        lo_hi = np.array([wilson(a * sizes.get(k, 0), sizes.get(k, 0)) for k, a in zip(ids, acc)])
        yerr = np.clip([acc - lo_hi[:, 0], lo_hi[:, 1] - acc], 0.0, None)  # acc may differ from c/n by an ulp
        ax.errorbar(x, acc, yerr=yerr, fmt="none", ecolor="black",
                    capsize=2, linewidth=0.8, label="95% interval from the test-split size")
    ax.axhline(summary["final"]["accuracy_mean"], color="k", linestyle="--", label="mean over clients")
    names = [f"{k}\n(test {sizes[k]})" if k in sizes else k for k in ids]
    ax.set_xticks(x, names, fontsize=7 if len(ids) <= 20 else 5, rotation=0 if len(ids) <= 20 else 90)
    ax.set_xlabel("client (partition id) and its test-split size")
    ax.set_ylabel("final personalized test accuracy (axis from 0)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1.05)
    # below the axes, never over the bars
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22 if len(ids) <= 20 else -0.3), ncol=2,
              frameon=False)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_client.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
