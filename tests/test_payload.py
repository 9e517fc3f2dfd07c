import numpy as np
import pytest

from fedpers.payload import Reply, serialized_nbytes, validate_reply
from fedpers.rounds.server import collect
from strategies import create_strategy, get_config_cls

SPEC = {"delta/prompts": (2, 4)}
METRICS = {"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.75, "num_test": 4.0}


def good(**kw):
    base = dict(partition_id=0, arrays={"delta/prompts": np.zeros((2, 4), np.float32)}, num_examples=10,
                metrics=dict(METRICS))
    base.update(kw)
    return Reply(**base)


def test_good_reply_passes():
    assert validate_reply(good(), SPEC, 1 << 20) is None


@pytest.mark.parametrize(
    "reply, reason",
    [
        (good(arrays={"delta/prompts": np.full((2, 4), np.nan, np.float32)}), "NaN or Inf"),
        (good(arrays={"delta/prompts": np.full((2, 4), np.inf, np.float32)}), "NaN or Inf"),
        (good(arrays={"delta/prompts": np.zeros((4, 2), np.float32)}), "shape (4, 2)"),
        (good(arrays={"delta/prompts": np.zeros((2, 4), np.float64)}), "dtype float64"),
        (good(arrays={}), "missing ['delta/prompts']"),
        (good(arrays={"delta/prompts": np.zeros((2, 4), np.float32), "delta/head": np.zeros(3, np.float32)}),
         "unexpected ['delta/head']"),
        (good(num_examples=-3), "num_examples"),
        (good(num_examples=0), "num_examples"),
        (good(num_examples=10**12), "num_examples"),
        (good(num_examples=2.5), "num_examples"),
        (good(metrics={**METRICS, "test_accuracy": float("nan")}), "metrics.test_accuracy"),
        (good(metrics={**METRICS, "test_accuracy": 3.0}), "outside [0, 1]"),
        (good(metrics={k: v for k, v in METRICS.items() if k != "train_loss"}), "metrics.train_loss"),
    ],
)
def test_bad_replies_are_rejected_with_a_reason(reply, reason):
    got = validate_reply(reply, SPEC, 1 << 20)
    assert got is not None and reason in got


def test_oversize_reply_is_rejected():
    r = good()
    assert "exceeds" in validate_reply(r, SPEC, serialized_nbytes(r.arrays) - 1)


def _strategy():
    cfg = get_config_cls("fedvpt")()
    return create_strategy(cfg, num_clients=3, shapes={"prompts": (2, 4)}, seed=0)


def test_bad_reply_never_touches_server_state():
    s = _strategy()
    before = s.state_dict()["global"]["prompts"].copy()
    raw = {
        0: good(partition_id=0, arrays={"delta/prompts": np.full((2, 4), np.nan, np.float32)}),
        1: good(partition_id=2),  # claims to be another client
    }
    ok, failed = collect(s, [0, 1, 2], raw, 1 << 20)
    assert ok == []
    assert [(f.partition_id, f.kind) for f in failed] == [(0, "invalid"), (1, "invalid"), (2, "missing")]
    np.testing.assert_array_equal(s.state_dict()["global"]["prompts"], before)


def test_reply_order_does_not_change_the_update():
    rng = np.random.default_rng(0)
    replies = {
        pid: good(partition_id=pid, arrays={"delta/prompts": rng.standard_normal((2, 4)).astype(np.float32)},
                  num_examples=int(5 + pid))
        for pid in range(3)
    }
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        s = _strategy()
        ok, failed = collect(s, [0, 1, 2], {pid: replies[pid] for pid in order}, 1 << 20)
        assert [u.partition_id for u in ok] == [0, 1, 2] and not failed
        from strategies import ClientUpdate

        s.aggregate(1, [ClientUpdate(u.partition_id, {"prompts": u.arrays["delta/prompts"]}, u.num_examples, {})
                        for u in ok])
        results.append(s.state_dict()["global"]["prompts"])
    np.testing.assert_array_equal(results[0], results[1])
