# SPDX-License-Identifier: Apache-2.0
"""Test settings: hypothesis profiles sized for a 2-core CI machine, the ``slow`` marker, shared fixtures."""
from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: a test that takes seconds (every-row hypergradient oracles, long unrolls); "
        "`python -m pytest -m \"not slow\"` is the quick loop, plain `python -m pytest` runs everything",
    )


@pytest.fixture
def float64_default() -> Iterator[None]:
    """float64 as torch's default dtype: torch then keeps its scalar state (NAdam's mu_product,
    ASGD's eta and mu, the step counts) in float64 too."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
