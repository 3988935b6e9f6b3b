# SPDX-License-Identifier: Apache-2.0
"""The run state of ``gimli-bptt lr --resume``: atomic saves, and loads that never run code."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from gimli_bptt.experiments.runstate import RunStateError, load, save_atomic


def test_round_trip_and_no_temporary_left(tmp_path: Path) -> None:
    path = tmp_path / "state" / "run.pt"
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "rec": {"acc": [0.5, 0.75]}, "rng": torch.get_rng_state()}
    save_atomic(state, path)
    loaded = load(path)
    assert loaded is not None and loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert not list(path.parent.glob(".*.tmp"))
    assert load(tmp_path / "missing.pt") is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_file_gives_a_clear_error_and_is_left_alone(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "run.pt"
    save_atomic({"epoch": 1, "x": torch.ones(1000)}, path)
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"\x00not a torch file" * 10, "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(RunStateError, match=r"cannot read the saved run state .*run\.pt.*--resume"):
        load(path)
    assert path.read_bytes() == damaged


class _Exploit:
    ran = False

    def __reduce__(self):  # noqa: ANN204 - what a crafted file would do on load
        return (_Exploit._run, ())

    @staticmethod
    def _run() -> None:
        _Exploit.ran = True


def test_a_crafted_file_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    torch.save({"epoch": 1, "payload": _Exploit()}, path)  # torch.save pickles the object as it is
    with pytest.raises(RunStateError):
        load(path)
    assert not _Exploit.ran
    path.write_bytes(pickle.dumps({"epoch": 1, "payload": _Exploit()}))  # a plain pickle, not torch's format
    with pytest.raises(RunStateError):
        load(path)
    assert not _Exploit.ran


def test_not_a_run_state(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(RunStateError, match="not a run state"):
        load(path)


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):  # noqa: ANN204
            raise RuntimeError("cannot save")

    with pytest.raises(RuntimeError, match="cannot save"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
