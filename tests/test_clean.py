# SPDX-License-Identifier: Apache-2.0
"""``gimli-bptt clean`` (data hyper-cleaning): the label corruption, a short run's outputs, resuming, bad flags."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gimli_bptt.__main__ import main
from gimli_bptt.experiments.data import corrupt_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["clean", "--train", "200", "--val", "100", "--unroll", "20", "--meta-steps", "12", "--eval-every", "4",
        "--seeds", "1", "--no-progress"]


@pytest.fixture
def extras() -> None:
    """Skips when the optional experiment dependencies are missing."""
    pytest.importorskip("sklearn", reason="gimli-bptt clean needs scikit-learn (the [experiments] extra)")
    pytest.importorskip("matplotlib", reason="gimli-bptt clean needs matplotlib (the [experiments] extra)")


def _check_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, f"{path} is not a non-empty PNG"


@pytest.mark.parametrize("n, fraction", [(800, 0.5), (201, 0.3), (10, 0.0), (7, 1.0)])
def test_corrupt_labels_changes_exactly_the_fraction_each_to_another_class(n: int, fraction: float) -> None:
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))
    noisy, corrupted = corrupt_labels(y, fraction, torch.Generator().manual_seed(1), num_classes=10)
    assert corrupted.dtype == torch.bool and corrupted.shape == y.shape
    assert int(corrupted.sum()) == int(round(fraction * n))  # exactly the fraction, not about it
    assert bool((noisy[corrupted] != y[corrupted]).all())  # every corrupted label is wrong
    assert bool((noisy[~corrupted] == y[~corrupted]).all())  # the others are untouched
    assert bool(((noisy >= 0) & (noisy < 10)).all())


def test_corrupt_labels_draws_every_other_class() -> None:
    y = torch.zeros(5000, dtype=torch.long)
    noisy, corrupted = corrupt_labels(y, 1.0, torch.Generator().manual_seed(0), num_classes=10)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0 and bool((counts[1:] > 400).all())  # about 5000 / 9 each


def test_corrupt_labels_rejects_a_bad_fraction() -> None:
    with pytest.raises(ValueError, match="fraction of corrupted labels must be in"):
        corrupt_labels(torch.zeros(4, dtype=torch.long), 1.5, torch.Generator())


def test_clean_tiny_writes_its_outputs_and_separates_the_weights(tmp_path: Path, extras: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clean"
    assert main(TINY + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("clean: done in ") and "hyper-cleaned" in printed[-1]  # the one-line summary
    result = json.loads((out / "clean.json").read_text())
    for key in ("baseline", "oracle", "cleaned", "f1"):
        assert set(result[key]) == {"mean", "std"}, key
        assert 0.0 <= result[key]["mean"] <= 1.0 and math.isfinite(result[key]["std"])
    (run,) = result["runs"]["exact"]
    assert len(run["val_loss"]) == 12 and run["eval_step"] == [0, 4, 8, 12]
    assert len(run["weights"]) == len(run["corrupted"]) == 200 and sum(run["corrupted"]) == 100
    w = torch.tensor(run["weights"])
    bad = torch.tensor(run["corrupted"])
    assert w[bad].mean() < w[~bad].mean() - 0.1  # the corrupted examples' weights average lower
    assert run["val_loss"][-1] < run["val_loss"][0]
    assert "| hyper-cleaned" in (out / "clean.md").read_text()
    _check_png(out / "clean_weights.png")
    _check_png(out / "clean_curves.png")


def test_clean_compares_hypergradients(tmp_path: Path, extras: None) -> None:
    out = tmp_path / "clean"
    args = ["clean", "--train", "100", "--val", "50", "--unroll", "6", "--meta-steps", "2", "--seeds", "1",
            "--no-progress", "--hypergradient", "exact,first-order,truncate:2"]
    assert main(args + ["--out", str(out)]) == 0
    result = json.loads((out / "clean.json").read_text())
    assert list(result["summary"]["hypergradients"]) == ["exact", "first-order", "truncate:2"]
    assert result["cleaned"] == result["summary"]["hypergradients"]["exact"]["cleaned"]
    weights = {h: result["runs"][h][0]["weights"] for h in result["runs"]}
    assert weights["exact"] != weights["first-order"] and weights["exact"] != weights["truncate:2"]
    assert "## Which hypergradient" in (out / "clean.md").read_text()


def test_clean_resumes_bit_identically_after_an_interrupt(tmp_path: Path, extras: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted at meta step 8, resumed with --resume from the state saved at meta step 5:
    the same numbers as a straight run."""
    import gimli_bptt.experiments.clean as clean_mod

    args = TINY + ["--save-every", "5"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "clean.json").read_text())

    calls = {"n": 0}
    real_accuracy = clean_mod.accuracy

    def interrupting_accuracy(model: Any, data: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 2 + 2 * 2 + 1:  # baseline and oracle, the scores at 0 and 4, then the one at 8
            raise KeyboardInterrupt
        return real_accuracy(model, data)

    monkeypatch.setattr(clean_mod, "accuracy", interrupting_accuracy)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed")])
    saved = torch.load(tmp_path / "resumed" / "state" / "exact-0.pt", weights_only=True)
    assert saved["meta_step"] == 5 and not saved["done"]
    monkeypatch.setattr(clean_mod, "accuracy", real_accuracy)
    assert main(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "clean.json").read_text())
    a, b = straight["runs"]["exact"][0], resumed["runs"]["exact"][0]
    for key in ("val_loss", "eval_step", "val_acc", "test_acc", "weights", "cleaned", "f1"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("argv, message", [
    (["clean", "--noise", "1.5"], "--noise: must be between 0 and 1"),
    (["clean", "--optimizer", "lbfgs"], "--optimizer: unknown optimizer 'lbfgs'"),
    (["clean", "--hypergradient", "exact,second"], "--hypergradient: unknown hypergradient 'second'"),
    (["clean", "--unroll", "5", "--hypergradient", "truncate:9"], "K must be an int between 1 and J = 5"),
    (["clean", "--train", "1500", "--val", "400"], "--train/--val: 1500 + 400 leaves no test digits"),
    (["clean", "--model", "cnn"], "--model: invalid choice"),
])
def test_clean_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
