# SPDX-License-Identifier: Apache-2.0
"""Saving a run's state atomically at every epoch, and resuming from it safely."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import GimliError


class RunStateError(GimliError, RuntimeError):
    """A saved run state that cannot be read (corrupted, truncated, or not a run state)."""


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash or an interrupt during the write leaves the previous file intact: the file is
    fsynced before the rename, the rename is atomic on POSIX file systems, and the folder is
    fsynced after it so that the rename itself survives a power loss.
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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path, progress_key: str = "epoch") -> Optional[dict[str, Any]]:
    """The saved state at ``path``, or None if there is none.

    ``progress_key`` names the entry that says how far the saved run got (``"epoch"`` for
    ``lr``, ``"iteration"`` for ``sine``); a file without it is not a run state.

    Read with ``torch.load(..., weights_only=True)``: a run state holds tensors and plain
    Python values only, so a crafted file cannot run code when it is loaded.

    Raises:
        RunStateError: the file is corrupted, truncated or holds something else; the message
            names the file and what to do. The file is left as it is.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        raise RunStateError(
            f"cannot read the saved run state {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "it is corrupted, truncated or not a run state of this program. Delete it (or the whole state "
            "folder) to start afresh, or run without --resume"
        ) from exc
    if not isinstance(state, dict) or progress_key not in state:
        raise RunStateError(f"{path} is not a run state of this program (no {progress_key}); delete it or run "
                            "without --resume")
    return state


__all__ = ["RunStateError", "load", "save_atomic"]
