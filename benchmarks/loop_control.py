"""The control of the feedback-loop benchmark (`python benchmarks/task_figures.py sst2-loop`): a verifier that calls
a fixed pseudo-random seventh of the outputs bad, whatever the model answered. The control loop then trains on as
many pool rows as the real loop (the model's errors are about a seventh of the pool), with their gold labels, but
chosen at random: the difference between the two loops is what learning from the errors adds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def random_seventh(output: str, example: Mapping[str, Any]) -> bool:
    """False (bad) for one input in seven, chosen by a hash of the input: the same inputs in every run."""
    text = json.dumps(example.get("input", example), sort_keys=True, ensure_ascii=False, default=str)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 7 != 0
