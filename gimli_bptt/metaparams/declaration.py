# SPDX-License-Identifier: Apache-2.0
"""The declaration of one meta-learnable hyperparameter: where a param group holds it and its valid range.

An optimizer declares its hyperparameters with :class:`Hyperparameter` (in its ``DiffOptimizer`` row); everything
else about φ_opt (which are learned, at which granularity, their values and cotangents) lives beside it in
:mod:`gimli_bptt.metaparams`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Hyperparameter:
    """A float option of a param group that can be meta-learned.

    Attributes:
        name: Our name, the key of ``hyper`` in ``step`` (Adam's ``betas`` are ``beta1``, ``beta2``).
        option: The param-group key that holds it (default: ``name``).
        index: Its position when the option is a tuple (``betas[0]``), else None.
        low: The lowest valid value (None: unbounded).
        high: The highest valid value (None: unbounded).
        open_low: ``low`` itself is invalid (eps > 0): projection stops just above it.
        open_high: ``high`` itself is invalid (beta < 1): projection stops just below it.
        default: The value when a param group lacks the option (None: the option is required).
        doc: What it is, for error messages and the README's table.
    """

    name: str
    option: Optional[str] = None
    index: Optional[int] = None
    low: Optional[float] = 0.0
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    default: Optional[float] = None
    doc: str = ""

    @property
    def key(self) -> str:
        """The param-group key."""
        return self.option or self.name

    def read(self, group: Mapping[str, Any]) -> float:
        """The value in a ``torch.optim`` param group, as a float."""
        if self.key not in group:
            if self.default is None:
                raise KeyError(f"the param group has no option {self.key!r}")
            return float(self.default)
        value = group[self.key]
        if self.index is not None:
            value = value[self.index]
        return float(value)

    def write(self, group: dict[str, Any], value: float) -> None:
        """Stores ``value`` into a param group (inside its tuple option when ``index`` is set)."""
        if self.index is None:
            group[self.key] = value
            return
        values = list(group[self.key])
        values[self.index] = value
        group[self.key] = tuple(values)

    @torch.no_grad()
    def project_(self, t: Tensor) -> None:
        """Clamps ``t`` in place into the valid range (projected gradient descent on φ_opt)."""
        finfo = torch.finfo(t.dtype)
        if self.low is not None:
            low = max(self.low + abs(self.low) * finfo.eps, self.low + finfo.tiny) if self.open_low else self.low
            t.clamp_(min=low)
        if self.high is not None:
            high = self.high - max(abs(self.high), 1.0) * finfo.eps if self.open_high else self.high
            t.clamp_(max=high)




__all__ = ["Hyperparameter"]
