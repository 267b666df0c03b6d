"""Fixtures for dispatcher and fault tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tiny_llama


@pytest.fixture(scope="session")
def slow_model(allowed_root: Path) -> Path:
    """Eight wider layers: a job of a few seconds, long enough to be interrupted mid-quantization."""
    return make_tiny_llama(
        allowed_root / "slow-llama", num_layers=8, seed=3, hidden_size=128, intermediate_size=256
    )
