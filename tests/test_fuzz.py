"""Property-based fuzzing (hypothesis) of the two doors into a run: client replies and config files.

Every generated reply is either rejected with a typed reason or accepted, and an accepted one keeps
the server state finite when aggregated; every generated config either loads into a config whose
numbers are finite or raises ConfigError (exit code 2), never another exception. Runs are
derandomized (same cases every time); the counts of tried/accepted/rejected cases are printed
(``pytest -s``) and must cover both outcomes, so a generator that only produced junk would fail.
"""

import collections
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpers.config import ConfigError, check_numbers

from fedpers.experiment import load_config
from fedpers.payload import REJECTION_CODES, Reply, validate_reply
from fedpers.rounds.server import _updates, state_is_finite
from strategies import create_strategy, get_config_cls

SPEC = {"delta/prompts": (2, 3), "delta/head.weight": (4, 3), "delta/head.bias": (4,)}
MAX_BYTES = 4096
MAX_NORM = 1e4
# FEDPERS_FUZZ_EXAMPLES=5000 fuzzes longer (the suite's default keeps each test well under 20 s).
FUZZ = settings(derandomize=True, deadline=None, database=None,
                max_examples=int(os.environ.get("FEDPERS_FUZZ_EXAMPLES", "100")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

numbers = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=5), st.sampled_from([0, 1, 5.9, 10, 10**7, 10**12, -5, float("inf"), float("nan")]),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
)
dtypes = st.one_of(st.just("<f4"), st.sampled_from([">f4", "<f8", "<f2", "<i4", "|u1", "|b1", "<c8", "O"]))


@st.composite
def arrays(draw, shape):
    dtype = np.dtype(draw(dtypes))
    shape = draw(st.one_of(st.just(shape), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)))
    if dtype.kind == "O":
        return np.empty(shape, dtype=object)
    if dtype.kind == "f" and draw(st.booleans()):  # values across the whole range, NaN/inf included
        vals = st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True)
        return draw(hnp.arrays(dtype, shape, elements=vals))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def near_valid(draw):
    """Right keys, dtype and shapes with values from the whole float32 range (huge, tiny, NaN, inf)
    and any integer count: the replies that test the value checks rather than the type checks."""
    wide = st.floats(width=32, allow_nan=draw(st.booleans()), allow_infinity=draw(st.booleans()))
    small = st.floats(-1, 1, width=32)
    arrs = {k: draw(hnp.arrays(np.float32, shape, elements=draw(st.sampled_from([wide, small]))))
            for k, shape in SPEC.items()}
    metrics = {"train_loss": draw(st.floats(0, 5)), "test_loss": draw(st.floats(0, 5)),
               "test_accuracy": draw(st.one_of(st.floats(0, 1), numbers)), "num_test": 4}
    n = draw(st.one_of(st.integers(1, 10**8), numbers))
    return Reply(draw(st.integers(0, 3)), arrs, n, metrics)


@st.composite
def anything(draw):
    keys = draw(st.one_of(st.just(list(SPEC)), st.lists(st.sampled_from([*SPEC, "delta/x", "", "prompts"]),
                                                          max_size=3, unique=True)))
    arrs = {k: draw(st.one_of(arrays(SPEC.get(k, (2,))), st.sampled_from([None, 3.0, [1.0, 2.0]]))) for k in keys}
    metrics = draw(st.one_of(
        st.fixed_dictionaries({k: numbers for k in ("train_loss", "test_loss", "test_accuracy", "num_test")}),
        st.dictionaries(st.text(max_size=4), numbers, max_size=3),
        st.fixed_dictionaries({"train_loss": st.floats(0, 5), "test_loss": st.floats(0, 5),
                               "test_accuracy": st.floats(0, 1), "num_test": st.integers(1, 50)}),
    ))
    return Reply(draw(st.integers(0, 3)), arrs, draw(numbers), metrics)


def replies():
    return st.one_of(near_valid(), anything())


def fresh_fedavg():
    return create_strategy(get_config_cls("fedavg")(server_lr=1.0), num_clients=4,
                           shapes={"prompts": (2, 3), "head.bias": (4,), "head.weight": (4, 3)}, seed=0)


@FUZZ
@given(replies())
def test_fuzzed_replies_are_rejected_with_a_code_or_keep_state_finite(reply):
    COUNTS["reply"]["tried"] += 1
    strategy = fresh_fedavg()
    spec = strategy.reply_spec(reply.partition_id)
    assert spec == SPEC  # the fuzzer targets the real reply spec of the strategy
    reason = validate_reply(reply, spec, MAX_BYTES, MAX_NORM)
    if reason is not None:
        assert reason.code in REJECTION_CODES and str(reason)
        COUNTS["reply"][f"rejected:{reason.code}"] += 1
        return
    COUNTS["reply"]["accepted"] += 1
    strategy.aggregate(1, _updates([reply], 100_000))
    assert state_is_finite(strategy.state_dict())


@st.composite
def configs(draw):
    """YAML text: mappings over real and made-up sections/fields with values of every kind, or raw text."""
    fields = {"run": ["seed", "rounds", "num_clients", "clients_per_round", "max_delta_norm", "max_memory_gb",
                      "client_timeout_s", "output_dir", "overwrite", "resume", "bogus"],
              "client": ["lr", "momentum", "batch_size", "local_epochs"], "model": ["num_prompts", "prompt_init_std"],
              "data": ["test_fraction", "dataset"], "strategy": ["name", "server_lr"], "nonsense": ["x"]}
    scalar = st.one_of(st.integers(-5, 30), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                       st.none(), st.text(max_size=6), st.sampled_from([".nan", ".inf", "-.inf", "1e400", "fedavg"]))
    value = st.one_of(scalar, st.lists(scalar, max_size=2), st.dictionaries(st.text(max_size=3), scalar, max_size=2))
    sections = draw(st.dictionaries(st.sampled_from(sorted(fields)), st.just(None), max_size=3))
    doc = {s: draw(st.dictionaries(st.sampled_from(fields[s]), value, max_size=3)) for s in sections}
    import yaml

    text = yaml.safe_dump(doc)
    return draw(st.one_of(st.just(text), st.text(max_size=40), st.just("- 1\n- 2\n"), st.just("run: [1\n")))


@FUZZ
@given(configs())
def test_fuzzed_config_files_load_or_raise_config_error(tmp_path_factory, text):
    COUNTS["config"]["tried"] += 1
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        COUNTS["config"]["rejected"] += 1
        assert e.field
        return
    COUNTS["config"]["accepted"] += 1
    check_numbers(cfg)  # an accepted config has only finite numbers
    assert cfg.run.seed >= 0 and math.isfinite(cfg.client.lr) and cfg.client.lr > 0


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for name, c in COUNTS.items():
        print(f"\nfuzz {name}: {dict(sorted(c.items()))}")
    for name in ("reply", "config"):
        if COUNTS[name]["tried"]:  # when the test ran: both outcomes were reached
            assert COUNTS[name]["accepted"] > 0 and COUNTS[name]["tried"] > COUNTS[name]["accepted"], COUNTS[name]
