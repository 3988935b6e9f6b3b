# SPDX-License-Identifier: Apache-2.0
"""Exception types raised by gimli_bptt, so callers can tell its failures apart."""
from __future__ import annotations


class GimliError(Exception):
    """Base of the errors the package raises on purpose: each message names the problem and the fix.

    The command line prints one of them as a single line and exits with status 2 (no traceback).
    """


class NonFiniteError(GimliError, FloatingPointError):
    """A loss, gradient or hypergradient is NaN or infinite.

    The message names the quantity, the inner step and, where known, the meta-parameter.
    A ``step()`` that raises it has changed nothing.
    """


class DistributedError(GimliError, RuntimeError):
    """A collective of a data-parallel meta step failed, timed out, or found the ranks out of step.

    Raised on a rank whose peer raised, exited or did not reach the same all-reduce within the
    process group's timeout. The message names the quantity being reduced and the rank; the
    meta step that raises it has changed nothing on this rank.
    """


__all__ = ["DistributedError", "GimliError", "NonFiniteError"]
