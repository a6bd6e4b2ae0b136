"""Fixtures for the peft tests only (autouse fixtures here apply to tests in this directory)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Hidden-32 models gain nothing from intra-op threads, and on a busy machine the thread pool's
    contention makes these tests several times slower; run them on one thread and restore the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
