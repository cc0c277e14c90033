"""Verifiers: grade a completion against a row's reference answer (True = correct).

A verifier is `f(completion: str, answer: str) -> bool`. Built in, by name:

* `exact`: the built-in task's rule when the answer is a decimal integer (the completion's
  leading run of digits, after whitespace, equals it: `shared.task.is_correct`); for any
  other answer, the stripped completion equals the stripped answer.
* `numeric`: the final number of each side, compared as numbers. The completion's final
  answer is the last `\\boxed{...}`, else what follows the last `####` (GSM8K style), else
  the last number in the text; the reference is read the same way (so a full GSM8K solution
  ending in `#### 72` works as an answer). Commas, `$` and `%` are ignored; 72, 72.0 and
  "72." are equal.
* `module:function`: any importable callable with that signature (a user verifier).

They grade the learner's sample accuracy and its held-out evaluation (services/learner).

    python -m shared.verifiers numeric "so the answer is \\boxed{1,234}" 1234
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from fractions import Fraction

Verifier = Callable[[str, str], bool]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####\s*([^\n]*)")


def exact(completion: str, answer: str) -> bool:
    """Exact match: leading digits for integer answers (the built-in task), else the stripped text."""
    from shared.task import Problem, is_correct

    if answer.isdigit():
        return is_correct(completion, Problem("", answer))
    return answer.strip() != "" and completion.strip() == answer.strip()


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _last_number(text: str) -> Fraction | None:
    found = _NUMBER.findall(text.replace("$", "").replace("%", ""))
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> Fraction | None:
    """The final answer of a text as an exact number: \\boxed{} > #### > the last number."""
    boxed = _boxed(text)
    if boxed is not None:
        return _last_number(boxed)
    hashes = _HASHES.findall(text)
    if hashes:
        return _last_number(hashes[-1])
    return _last_number(text)


def numeric(completion: str, answer: str) -> bool:
    """The completion's final number equals the answer's (both must have one)."""
    want = final_number(answer)
    return want is not None and final_number(completion) == want


BUILTIN: dict[str, Verifier] = {"exact": exact, "numeric": numeric}


def load_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or `module:function` imported (ValueError saying why not)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown verifier {name!r}: use one of {', '.join(BUILTIN)} or module:function")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"verifier {name!r}: cannot import {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"verifier {name!r}: {module_name} has no callable {attr!r}")
    return fn


def main(argv: list[str] | None = None) -> None:
    """Grade one completion: python -m shared.verifiers NAME COMPLETION ANSWER."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.exit("usage: python -m shared.verifiers NAME COMPLETION ANSWER")
    print(load_verifier(args[0])(args[1], args[2]))


if __name__ == "__main__":
    main()
