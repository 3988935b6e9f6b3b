# SPDX-License-Identifier: Apache-2.0
"""Former home of the optimizer configurations: the numeric helpers that test files still import from here.

The configurations are rows of tests/optim_table.py now (``OptimCase`` is its :class:`Row`:
``OptimCase(id, torch_cls, kwargs, group2)`` builds one). Import from ``optim_table`` in new
code; this module goes once nothing imports it.
"""
from __future__ import annotations

from optim_table import DTYPE, GRANULARITIES, Row, assert_rel, learn, random_like, rel_err, tensor_keys

OptimCase = Row

__all__ = ["DTYPE", "GRANULARITIES", "OptimCase", "assert_rel", "learn", "random_like", "rel_err", "tensor_keys"]
