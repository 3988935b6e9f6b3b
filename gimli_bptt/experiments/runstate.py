# SPDX-License-Identifier: Apache-2.0
"""Saving a run's state atomically at every epoch, and resuming from it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash or an interrupt during the write leaves the previous file intact: the rename is
    atomic on POSIX file systems.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path) -> Optional[dict[str, Any]]:
    """The saved state at ``path``, or None if there is none."""
    if not path.exists():
        return None
    return torch.load(path, weights_only=False)


__all__ = ["load", "save_atomic"]
