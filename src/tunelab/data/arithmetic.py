"""Arithmetic problems with their answers, generated from a seed: prompts for learning from a verifier (GRPO with
`tunelab.evaluate.verifiers:final_number`), with nothing to download.

A kind names the operands by their digit counts and the operators between them: "2+1" is a two-digit number plus
a one-digit number (34 + 7), "1*2" a one-digit number times a two-digit one (6 * 47), "1+1+1" three one-digit
numbers added. Operators: + - *; a subtraction never goes below zero (its first operand is the larger).
Each record: {"prompt": "What is 34 + 7? Answer with the number only.", "answer": 41, "problem": "34 + 7",
"kind": "2+1"}. The kinds take turns, so every kind is equally common; problems do not repeat.

Two verifiers check the answers (`module:function` names for task.rewards): the built-in
`tunelab.evaluate.verifiers:final_number` (the last number of the output is the answer) and `number_only` here
(the output is a number alone, as the prompt asks; right or wrong).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

PROMPT = "What is {problem}? Answer with the number only."
DEFAULT_KINDS = ("2+1", "1*2", "2+2")
_KIND = re.compile(r"^[1-9](?:[-+*][1-9])+$")
_BARE_NUMBER = re.compile(r"^\s*-?\d[\d,]*(?:\.\d+)?\.?\s*$")


def parse_kind(kind: str) -> tuple[list[int], list[str]]:
    """'2+1' -> ([2, 1], ['+']): operand digit counts and operators; ValueError for anything else."""
    if not _KIND.match(kind):
        raise ValueError(f"arithmetic kind {kind!r}: expected digit counts joined by + - *, e.g. '2+1' or '1*2'")
    return [int(d) for d in kind[::2]], list(kind[1::2])


def _operand(digits: int, rng: random.Random) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def kind_size(kind: str) -> int:
    """How many problems of `kind` there are (operand choices multiplied)."""
    size = 1
    for digits in parse_kind(kind)[0]:
        size *= 10 ** digits - (1 if digits == 1 else 10 ** (digits - 1))
    return size


def make_problem(kind: str, rng: random.Random) -> tuple[str, int]:
    """(problem text, answer) of one problem of `kind`, e.g. ('34 + 7', 41)."""
    digits, operators = parse_kind(kind)
    numbers = [_operand(d, rng) for d in digits]
    if operators == ["-"] and numbers[0] < numbers[1]:
        numbers.reverse()
    text = " ".join(str(n) if i == 0 else f"{operators[i - 1]} {n}" for i, n in enumerate(numbers))
    return text, evaluate(numbers, operators)


def evaluate(numbers: Sequence[int], operators: Sequence[str]) -> int:
    """The value of numbers[0] op numbers[1] op ..., multiplication before addition and subtraction."""
    terms, signs = [numbers[0]], [1]
    for op, n in zip(operators, numbers[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def arithmetic_problems(count: int, *, seed: int = 0, kinds: Sequence[str] = DEFAULT_KINDS,
                        exclude: set[str] | None = None, template: str = PROMPT) -> list[dict]:
    """`count` distinct problems (none of `exclude`), the kinds in turn, drawn from random.Random(seed)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for kind in kinds:
        parse_kind(kind)
    if not kinds:
        raise ValueError("no arithmetic kinds given")
    rng = random.Random(seed)
    seen = set(exclude or ())
    records: list[dict] = []
    attempts = 0
    while len(records) < count:
        kind = kinds[len(records) % len(kinds)]
        problem, answer = make_problem(kind, rng)
        attempts += 1
        if attempts > 100 * max(1, count):
            raise ValueError(f"cannot draw {count} distinct problems of kinds {', '.join(kinds)}: kind {kind} has "
                             f"{kind_size(kind)} problems in all; ask for fewer or use larger kinds")
        if problem in seen:
            continue
        seen.add(problem)
        records.append({"prompt": template.format(problem=problem), "answer": answer, "problem": problem,
                        "kind": kind})
    return records


def number_only(output: str, example: dict) -> bool:
    """A verifier of the prompt's format: True when the output is one number and nothing else ("41", " 1,234."),
    whether or not it is the answer."""
    return bool(_BARE_NUMBER.match(output))
