"""Model selection on the validation split (``data.val_fraction``), never on test.

Clients with a validation split report ``val_loss`` / ``val_accuracy`` every round, scored by their
strategy's own evaluator (:func:`fedpers.client.validation_metrics`). This module keeps each client's
latest validation score beside its latest test score, writes per round what the run would report if it
stopped there (``as_of_round``: every client's latest evaluation, the population of ``summary.final``),
and picks the validation-best round: the highest mean validation accuracy, or for a causal LM the lowest
mean validation perplexity. ``summary.json``'s ``validation`` block gives the test figures at that round
beside the last round's, so a table can say which one it reports.
"""

from __future__ import annotations

import math

import numpy as np

from fedpers.payload import Reply


def _mean(d: dict[int, float]) -> float:
    return float(np.mean(list(d.values()))) if d else float("nan")


def _perplexity(d: dict[int, float]) -> float:
    ppl = [math.exp(v) for v in d.values() if math.isfinite(v)]
    return float(np.mean(ppl)) if ppl else float("nan")


class ValidationTrack:
    """Each client's latest validation score; restored from a checkpoint's ledger state on resume."""

    def __init__(self, llm: bool, state: dict | None = None):
        self.llm = llm
        state = state or {}
        self.acc: dict[int, float] = {int(k): v for k, v in state.get("last_val_acc", {}).items()}
        self.loss: dict[int, float] = {int(k): v for k, v in state.get("last_val_loss", {}).items()}

    def state_dict(self) -> dict:
        return {"last_val_acc": {str(k): v for k, v in self.acc.items()},
                "last_val_loss": {str(k): v for k, v in self.loss.items()}}

    def round_fields(self, ok: list[Reply], last_acc: dict[int, float], last_loss: dict[int, float]) -> dict:
        """This round's validation means (its replying clients, as ``accuracy_mean``) and ``as_of_round``;
        {} when no client has a validation split."""
        val = [u for u in ok if "val_accuracy" in u.metrics]
        self.acc.update({u.partition_id: float(u.metrics["val_accuracy"]) for u in val})
        self.loss.update({u.partition_id: float(u.metrics["val_loss"]) for u in val})
        if not self.acc:
            return {}
        as_of = {"accuracy_mean": _mean(last_acc), "test_loss_mean": _mean(last_loss),
                 "val_accuracy_mean": _mean(self.acc), "val_loss_mean": _mean(self.loss)}
        if self.llm:
            as_of.update(perplexity_mean=_perplexity(last_loss), val_perplexity_mean=_perplexity(self.loss))
        return {
            "val_accuracy_mean": float(np.mean([float(u.metrics["val_accuracy"]) for u in val])) if val else float("nan"),
            "val_loss_mean": float(np.mean([float(u.metrics["val_loss"]) for u in val])) if val else float("nan"),
            "as_of_round": as_of,
        }

    def summary(self, rows: list[dict]) -> dict | None:
        """The ``validation`` block of summary.json (None without a validation split): the criterion, the
        validation-best round, and every client's latest figures as of that round and as of the last."""
        marked = [r for r in rows if r.get("as_of_round")]
        if not marked:
            return None
        key, sign = ("val_perplexity_mean", 1.0) if self.llm else ("val_accuracy_mean", -1.0)
        scores = [sign * r["as_of_round"][key] for r in marked]
        finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
        best = marked[min(finite, key=lambda i: (scores[i], i))] if finite else marked[-1]  # ties: the earliest
        return {"criterion": key, "best": "min" if sign > 0 else "max", "best_round": best["round"],
                "at_best_round": best["as_of_round"], "at_last_round": marked[-1]["as_of_round"],
                "last_round": marked[-1]["round"]}
