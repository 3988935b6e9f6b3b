# SPDX-License-Identifier: Apache-2.0
"""The experiments: ``gimli-bptt clean`` (data hyper-cleaning on the scikit-learn digits),
``gimli-bptt lr`` and ``maml`` (the paper's Section 5 on the digits) and ``gimli-bptt sine``
(K-shot sinusoid regression, beside the published numbers)."""
from __future__ import annotations

import importlib.util

from ..errors import GimliError

EXTRAS = ("sklearn", "matplotlib")
INSTALL_HINT = "pip install 'gimli_bptt[experiments]'  (or: pip install scikit-learn matplotlib)"


class MissingExtraError(GimliError, RuntimeError):
    """An optional dependency of the experiments (scikit-learn, matplotlib) is not installed."""


def require_extras() -> None:
    """Raises :class:`MissingExtraError` naming the missing packages and the install command."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("scikit-learn" if m == "sklearn" else m for m in missing)
        raise MissingExtraError(f"the experiments need {names}, which is not installed: {INSTALL_HINT}")


__all__ = ["EXTRAS", "INSTALL_HINT", "MissingExtraError", "require_extras"]
