"""Flower clients keep their personal state on their node's disk, so a resumed run is the run that was
interrupted (under the fast engine the checkpoint carries client states; under Flower it cannot)."""

import json

import numpy as np
import pytest

from fedpers import simulate
from fedpers.flower.node_state import NodeStateStore, store_for
from tests.conftest import tiny_overrides


def test_store_loads_the_state_before_the_round_and_prunes_what_no_resume_needs(tmp_path):
    store = NodeStateStore(tmp_path, "ab12cd34")
    assert store.load(3, 1) == {}
    for rnd in (1, 2, 3, 5, 6):
        store.save(3, rnd, {"head.bias": np.full(2, rnd, np.float32)}, checkpoint_every=2)
    # Round 6 done, checkpoint at least at 4 (multiple of 2 before 6): rounds 3 (newest <= 4), 5, 6 kept.
    assert store.rounds(3) == [3, 5, 6]
    assert float(store.load(3, 5)["head.bias"][0]) == 3  # a resume from round 4 restarts round 5 from 3
    assert float(store.load(3, 7)["head.bias"][0]) == 6
    assert store.load(4, 7) == {}  # another partition, nothing stored
    with pytest.raises(ValueError):
        NodeStateStore(tmp_path, "../../etc")
    assert store_for({"state-dir": str(tmp_path)}, {"state_id": ""}) is None  # the server sent no id
    assert store_for({"state-dir": str(tmp_path / "node")}, {"state_id": "ab12cd34"}).root == (
        tmp_path / "node" / "ab12cd34")
    assert store_for({}, {"state_id": "ab12cd34"}) is None  # no folder given: nothing written anywhere


def _final(out):
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("round_time_s", "wall_time_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())["final"]["per_client"]


@pytest.mark.slow
def test_flower_resume_is_bit_identical(tmp_path):
    # fedper: a personal head per client, so a head lost on resume would show in every client's accuracy.
    # Two rounds are enough: the resumed round 2 trains from the heads that round 1 left on the nodes' disk.
    kw = {"run.engine": "flower", "run.rounds": 2, "run.num_cpus_per_client": 2, "strategy.name": "fedper"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert simulate.main(tiny_overrides(full, **kw)) == 0
    assert simulate.main(tiny_overrides(cut, **{**kw, "run.rounds": 1})) == 0
    assert simulate.main(tiny_overrides(cut, **{**kw, "run.resume": "true"})) == 0
    assert _final(cut) == _final(full)
    (state_id,) = [p.name for p in (cut / "client_state").iterdir()]  # one run id: the resume reused it
    assert NodeStateStore(cut / "client_state", state_id).rounds(0)[-1] == 2
