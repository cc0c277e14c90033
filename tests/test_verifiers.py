"""Verifiers: exact match, the numeric final answer (\\boxed{}, ####, last number), import-path loading."""

from __future__ import annotations

import pytest

from shared.verifiers import exact, final_number, load_verifier, numeric


def test_exact_keeps_the_builtin_rule_and_matches_text():
    assert exact("168<eos>junk", "168") and exact(" 168", "168")
    assert not exact("1680", "168") and not exact("", "168")
    assert exact("  Paris \n", "Paris") and not exact("Paris, France", "Paris")
    assert not exact("", "")


@pytest.mark.parametrize("completion, answer, ok", [
    ("so 3 + 4 = 7", "7", True),
    ("The answer is \\boxed{1,234}.", "1234", True),
    ("\\boxed{\\frac{1}{2}} then 9", "9", False),  # the boxed part decides, not the trailing 9
    ("\\boxed{{72}}", "72", True),
    ("work 5 ... #### 72\n", "72.0", True),
    ("It costs $18.", "Janet sells ... 9 * 2 = 18 dollars.\n#### 18", True),
    ("-3", "-3", True),
    ("it is 0.5", ".5", True),
    ("twelve", "12", False),
    ("12", "", False),
    ("12%", "12", True),
])
def test_numeric_reads_the_final_answer(completion, answer, ok):
    assert numeric(completion, answer) is ok


def test_final_number_forms():
    assert final_number("a 1 b 2,500.25 c") == 2500.25
    assert final_number("#### 4\n#### 5") == 5
    assert final_number("no digits") is None


def test_load_verifier_by_name_and_import_path():
    assert load_verifier("exact") is exact and load_verifier("numeric") is numeric
    assert load_verifier("shared.verifiers:numeric") is numeric
    with pytest.raises(ValueError, match="unknown verifier 'fuzzy'"):
        load_verifier("fuzzy")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_x'"):
        load_verifier("no_such_module_x:f")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_verifier("shared.verifiers:nope")
