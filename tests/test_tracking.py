"""run.tensorboard=true: the event files hold every round's metrics.jsonl numbers and the plots."""

import json

import pytest

from fedpers import simulate
from tests.conftest import tiny_overrides


def test_tensorboard_events_hold_each_rounds_metrics_and_the_plots(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert simulate.main(tiny_overrides(out, **{"run.rounds": 3, "run.tensorboard": "true"})) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    for key, tag in (("accuracy_mean", "accuracy/mean"), ("accuracy_worst10", "accuracy/worst10"),
                     ("bytes_up_per_client", "bytes/up_per_client")):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [r["round"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    client0 = [e.value for e in ea.Scalars("client/0/accuracy")]
    assert client0 == pytest.approx([r["clients"]["0"]["accuracy"] for r in rows], rel=1e-6)
    assert {"plots/accuracy_per_round", "plots/accuracy_per_client"} <= set(ea.Tags()["images"])
