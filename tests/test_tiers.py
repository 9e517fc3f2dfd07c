"""The test tiers of conftest.py name only tests that exist: a renamed or deleted test would otherwise leave a
stale entry behind, and its replacement would silently run in the fast tier (or never be marked slow)."""

import ast
from pathlib import Path

from tests import conftest

TESTS = Path(__file__).resolve().parent


def _test_functions(module: str) -> set[str]:
    """Top-level ``test_*`` functions of a test module, and ``Class::test_*`` methods of its test classes."""
    tree = ast.parse((TESTS / module).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {
                f"{node.name}::{f.name}"
                for f in node.body
                if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.name.startswith("test")
            }
    return names


def test_every_slow_tests_entry_names_an_existing_test():
    stale = []
    for entry in conftest.SLOW_TESTS:
        module, _, name = entry.partition("::")
        name = name.split("[")[0]  # an entry may name one parametrized case: module::test_x[case]
        if not (TESTS / module).is_file() or name not in _test_functions(module):
            stale.append(entry)
    assert not stale, f"SLOW_TESTS names tests that do not exist: {stale}"


def test_the_fast_conformance_cases_exist():
    from tests.test_strategy_conformance import _cases

    assert conftest.FAST_CONFORMANCE_CASES <= set(_cases())


def test_the_check_finds_a_stale_name():
    assert "test_every_slow_tests_entry_names_an_existing_test" in _test_functions("test_tiers.py")
    assert "test_no_such_test" not in _test_functions("test_tiers.py")
