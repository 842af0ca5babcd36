"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest

from train_helpers import free_port


@pytest.fixture
def single_rank(monkeypatch):
    """This process is rank 0 of a 1-rank DeepSpeed job on the CPU."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
