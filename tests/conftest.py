"""Shared test fixtures: the reference fixture folder and a small built-in real/fake dataset."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

# The suite runs as two pytest-xdist workers on CI's two cores; the tensors are tiny, so a
# second intra-op thread per worker would only add synchronisation.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {SHARED_FIXTURES} (they live in ../shared beside a CI checkout)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory) -> Path:
    """Real crops and resampled fakes, 32 px: train 96, val 32, test 48 of each."""
    from patchscope.forensics.builtin_images import write_builtin_dataset

    return write_builtin_dataset(tmp_path_factory.mktemp("builtin"), {"train": 96, "val": 32, "test": 48},
                                 size=32, seed=0)
