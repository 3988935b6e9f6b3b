# SPDX-License-Identifier: Apache-2.0
"""Small helpers for the experiments' result files: finite checks and mean ± standard deviation."""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def check_finite(obj: Any, path: str = "") -> None:
    """Raises ``FloatingPointError`` if any float in a nested dict/list is NaN or infinite."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise FloatingPointError(f"non-finite value at {path or 'top level'}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{path}[{i}]")


__all__ = ["check_finite", "mean_std"]
