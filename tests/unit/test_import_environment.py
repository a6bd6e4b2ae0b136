"""Importing tunelab sets torch's environment defaults unless the user chose: transparent huge pages
(THP_MEM_ALLOC_ENABLE) and a bounded oneDNN kernel cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY; the memory it saves is
measured by benchmarks/kernel_caches.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
CHOSEN = ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
HUGE_PAGES = ("import os, resource, tunelab, torch\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "x = torch.ones(64 << 20 >> 2)  # 64 MB, written once\n"
              "print(os.environ.get('THP_MEM_ALLOC_ENABLE'),\n"
              "      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
KERNEL_CACHE = ("import os, tunelab\n"
                "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ.get('LRU_CACHE_CAPACITY'))")


def _run(script: str, **env) -> list[str]:
    """What `script` prints in a fresh Python where none of CHOSEN is set but those in `env`."""
    base = {k: v for k, v in os.environ.items() if k not in CHOSEN}
    return subprocess.run([sys.executable, "-c", script], env={**base, "PYTHONPATH": SRC, **env},
                          capture_output=True, text=True, check=True).stdout.split()


def _offered() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _offered(), reason="the kernel offers no transparent huge pages")
def test_import_turns_huge_pages_on_and_a_64_mb_tensor_faults_far_fewer_pages():
    value, faults = _run(HUGE_PAGES)
    faults = int(faults)
    assert value == "1"
    off_value, off_faults = _run(HUGE_PAGES, THP_MEM_ALLOC_ENABLE="0")
    off_faults = int(off_faults)
    assert off_value == "0"  # the user's choice stands
    assert off_faults >= 64 * 256 * 0.9  # 4 KB pages: about 16,384 faults
    assert faults < off_faults / 4


def test_import_bounds_onednn_kernel_cache_and_leaves_ideep_alone():
    assert _run(KERNEL_CACHE) == ["64", "None"]


def test_the_users_kernel_cache_capacity_stands():
    assert _run(KERNEL_CACHE, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == ["1024", "None"]
