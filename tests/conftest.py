"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest

from train_helpers import set_single_rank


@pytest.fixture
def single_rank(monkeypatch):
    """This process is rank 0 of a 1-rank DeepSpeed job on the CPU."""
    set_single_rank(monkeypatch)
