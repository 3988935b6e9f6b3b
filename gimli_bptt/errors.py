# SPDX-License-Identifier: Apache-2.0
"""Exception types raised by gimli_bptt, so callers can tell its failures apart."""
from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A loss, gradient or hypergradient is NaN or infinite.

    The message names the quantity, the inner step and, where known, the meta-parameter.
    A ``step()`` that raises it has changed nothing.
    """


__all__ = ["NonFiniteError"]
