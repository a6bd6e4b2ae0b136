"""Verifiers: Python functions that judge one model output, named in a config as `module:function`.

A verifier is called as `function(output, example)`: `output` is the model's text, `example` the data row it
answered (a dict: the prompt and whatever reference fields the data has, such as `answer` or `label`). It
returns one of

- a bool (True: good, score 1.0; False: bad, score 0.0),
- "good" or "bad",
- a number (a score; higher is better),
- a (verdict or score, critique) pair, the critique a sentence that says what is wrong,
- a dict with any of `verdict`, `score`, `critique`.

`load_verifier("package.module:function")` imports it; `"path/to/file.py:function"` loads a file, so a
project's own checks need no package. The same verifiers label outputs for the feedback store and give GRPO its
rewards (`Judgement.reward`). Three come with tunelab: `final_number`, `exact_match` and `json_object`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

Verifier = Callable[[str, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Judgement:
    """What a verifier said of one output: a verdict ("good" / "bad"), a score, or both, and maybe a critique."""

    verdict: str | None = None
    score: float | None = None
    critique: str | None = None

    @property
    def reward(self) -> float:
        """The number GRPO maximises: the score when there is one, else 1.0 for good and 0.0 for bad."""
        if self.score is not None:
            return self.score
        return 1.0 if self.verdict == "good" else 0.0


def load_verifier(spec: str) -> Verifier:
    """The function named by `spec`: "module.path:function" (imported) or "file.py:function" (loaded)."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"verifier {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"verifier {spec!r}: no such file {path}")
        loader_spec = importlib.util.spec_from_file_location(f"tunelab_verifier_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            raise ConfigError(f"verifier {spec!r}: loading {path} failed: {type(error).__name__}: {error}") from error
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"verifier {spec!r}: cannot import {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"verifier {spec!r}: {module_name} has no function {function_name!r}")
    return function


def judge(verifier: Verifier, output: str, example: Mapping[str, Any], *, name: str = "verifier") -> Judgement:
    """Call `verifier` on one output and read its answer as a `Judgement` (a clear error for anything else)."""
    return as_judgement(verifier(output, example), name)


def as_judgement(value: Any, name: str = "verifier") -> Judgement:
    """A verifier's return value as a Judgement (see the module docstring for the accepted forms)."""
    if isinstance(value, Judgement):
        return value
    if isinstance(value, bool):
        return Judgement("good" if value else "bad", 1.0 if value else 0.0)
    if isinstance(value, str):
        if value not in ("good", "bad"):
            raise ValueError(f"{name} returned {value!r}; a verdict is 'good' or 'bad'")
        return Judgement(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name} returned the score {value}; scores must be finite")
        return Judgement(None, float(value))
    if isinstance(value, tuple) and len(value) == 2:
        first, critique = value
        if critique is not None and not isinstance(critique, str):
            raise ValueError(f"{name} returned a critique of type {type(critique).__name__}; expected a string")
        judged = as_judgement(first, name)
        return Judgement(judged.verdict, judged.score, critique or None)
    if isinstance(value, Mapping):
        unknown = set(value) - {"verdict", "score", "critique"}
        if unknown:
            raise ValueError(f"{name} returned unknown keys {sorted(unknown)}; expected verdict, score, critique")
        verdict, score, critique = value.get("verdict"), value.get("score"), value.get("critique")
        if verdict is None and score is None:
            raise ValueError(f"{name} returned neither a verdict nor a score")
        judged = Judgement(as_judgement(verdict, name).verdict if verdict is not None else None,
                           as_judgement(score, name).score if score is not None else None, critique or None)
        return judged
    raise ValueError(f"{name} returned {type(value).__name__}; expected a bool, 'good'/'bad', a number, "
                     "a (verdict, critique) pair or a dict")


# ---- verifiers that come with tunelab ----------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def final_number(output: str, example: Mapping[str, Any]) -> Judgement:
    """Good when the last number in the output equals `example["answer"]` (arithmetic, GSM8K-style answers)."""
    expected = _number(str(example["answer"]))
    found = _number(output)
    if found is None:
        return Judgement("bad", 0.0, "The answer gives no number.")
    if expected is not None and math.isclose(found, expected, rel_tol=0.0, abs_tol=1e-6):
        return Judgement("good", 1.0)
    return Judgement("bad", 0.0, f"The final number is {found:g}, which is wrong.")


def exact_match(output: str, example: Mapping[str, Any]) -> Judgement:
    """Good when the output, stripped and lower-cased, equals `example["reference"]` (or `answer`, `label`)."""
    for key in ("reference", "answer", "label", "target"):
        if key in example:
            expected = str(example[key])
            break
    else:
        raise KeyError("exact_match needs a 'reference', 'answer', 'label' or 'target' field in the example")
    if output.strip().lower() == expected.strip().lower():
        return Judgement("good", 1.0)
    return Judgement("bad", 0.0, f"The answer should be {expected!r}.")


def json_object(output: str, example: Mapping[str, Any]) -> Judgement:
    """Output-format check: good when the output is one JSON object holding every key of `example["keys"]`
    (a list; none required when absent). Scores 0.5 for valid JSON that misses keys."""
    text = output.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return Judgement("bad", 0.0, f"The output is not valid JSON ({error.msg}).")
    if not isinstance(value, dict):
        return Judgement("bad", 0.0, f"The output is a JSON {type(value).__name__}, not an object.")
    missing = [k for k in example.get("keys", []) if k not in value]
    if missing:
        return Judgement("bad", 0.5, f"The JSON object lacks the keys {', '.join(missing)}.")
    return Judgement("good", 1.0)
