"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from helpers import calibrated_dense


@pytest.fixture
def dense() -> torch.nn.Module:
    return calibrated_dense()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]
