"""Importing tunelab bounds oneDNN's cache of compiled kernels (ONEDNN_PRIMITIVE_CACHE_CAPACITY) unless the user
chose; the memory it saves is measured by benchmarks/kernel_caches.py."""

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
SCRIPT = "import os, tunelab; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ.get('LRU_CACHE_CAPACITY'))"


def _run(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**base, "PYTHONPATH": SRC, **env},
                          capture_output=True, text=True, check=True).stdout.split()


def test_import_bounds_onednn_kernel_cache_and_leaves_ideep_alone():
    assert _run() == ["64", "None"]


def test_the_users_capacity_stands():
    assert _run(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == ["1024", "None"]
