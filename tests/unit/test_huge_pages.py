"""Importing tunelab asks torch for transparent huge pages (THP_MEM_ALLOC_ENABLE) unless the user chose."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
SCRIPT = ("import os, resource, tunelab, torch\n"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "x = torch.ones(64 << 20 >> 2)  # 64 MB, written once\n"
          "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def _run(**env) -> tuple[str, int]:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, "PYTHONPATH": SRC, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def _offered() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _offered(), reason="the kernel offers no transparent huge pages")
def test_import_turns_huge_pages_on_and_a_64_mb_tensor_faults_far_fewer_pages():
    value, faults = _run()
    assert value == "1"
    off_value, off_faults = _run(THP_MEM_ALLOC_ENABLE="0")
    assert off_value == "0"  # the user's choice stands
    assert off_faults >= 64 * 256 * 0.9  # 4 KB pages: about 16,384 faults
    assert faults < off_faults / 4
