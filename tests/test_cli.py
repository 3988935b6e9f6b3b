# SPDX-License-Identifier: Apache-2.0
"""The ``gimli-bptt`` command line: ``lr``, ``maml`` and ``sine`` on tiny settings, bad flags, missing extras."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gimli_bptt.__main__ import main
from gimli_bptt.progress import Progress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def extras() -> None:
    """Skips when the optional experiment dependencies are missing."""
    pytest.importorskip("sklearn", reason="gimli-bptt lr/maml need scikit-learn (the [experiments] extra)")
    pytest.importorskip("matplotlib", reason="gimli-bptt lr/maml need matplotlib (the [experiments] extra)")


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _numbers(v)]
    return []


def _check_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, f"{path} is not a non-empty PNG"


@pytest.mark.slow
def test_lr_tiny(tmp_path: Path, extras: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lr"
    rc = main(["lr", "--epochs", "2", "--unroll", "2", "--width", "4", "--batch-size", "64", "--seeds", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert "final test acc" in capsys.readouterr().out
    result = json.loads((out / "lr.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(result))
    assert set(result["runs"]) == {"fixed", "multistep", "meta"}
    for variant, runs in result["runs"].items():
        (run,) = runs
        assert run["epoch"] == [1, 2]
        assert all(0.0 <= a <= 1.0 for a in run["test_acc"] + [run["initial_test_acc"]])
        assert len(run["rates"]) == 2 and all(len(r) == len(run["group_names"]) for r in run["rates"])
        assert all(r >= 0 for row in run["rates"] for r in row)
    assert result["runs"]["fixed"][0]["rates"][-1] == [0.1] * len(result["runs"]["fixed"][0]["group_names"])
    assert len(result["runs"]["meta"][0]["val_loss"]) == 2
    assert result["runs"]["meta"][0]["rates"][-1] != result["runs"]["meta"][0]["initial_rates"]  # rates moved
    for variant in ("fixed", "multistep", "meta"):
        assert 0.0 <= result["summary"][variant]["final_test_acc_mean"] <= 1.0
    _check_png(out / "lr_accuracy.png")
    _check_png(out / "lr_rates.png")


@pytest.mark.slow
def test_maml_tiny(tmp_path: Path, extras: None) -> None:
    out = tmp_path / "maml"
    rc = main(["maml", "--ways", "3", "--shots", "1,2", "--queries", "2", "--unroll", "2", "--meta-steps", "2",
               "--meta-batch", "2", "--width", "4", "--test-tasks", "3", "--seeds", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    result = json.loads((out / "maml.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(result))
    assert len(result["runs"]) == 2 * 2 * 2  # optimizers x shots x seeds
    for opt in ("sgd", "adam"):
        for k in ("1", "2"):
            s = result["summary"][opt][k]
            assert 0.0 <= s["test_acc_mean"] <= 1.0 and s["test_acc_std"] >= 0.0 and s["seeds"] == 2
    adam = next(r for r in result["runs"] if r["optimizer"] == "adam")
    assert set(adam["values"]) == {"lr", "beta1", "beta2"}
    assert all(0.0 <= b < 1.0 for row in adam["values"]["beta2"] for b in row)
    table = (out / "maml.md").read_text()
    assert "3-way 1-shot" in table and "3-way 2-shot" in table and "±" in table
    _check_png(out / "maml_rates_sgd.png")
    _check_png(out / "maml_rates_adam.png")


@pytest.mark.parametrize("argv, message", [
    (["lr", "--epochs", "0"], "--epochs: must be positive"),
    (["lr", "--unroll", "x"], "--unroll/-J: expected a int"),
    (["lr", "--optimizer", "rmsprop"], "--optimizer: invalid choice"),
    (["lr", "--val-frac", "1.5"], "--val-frac: must be between 0 and 1"),
    (["lr", "--device", "nonsense"], "--device: not a torch device"),
    (["maml", "--shots", "1,a"], "--shots: expected comma-separated ints"),
    (["maml", "--optimizer", "sgd,rmsprop"], "--optimizer: expected a comma-separated list"),
    (["maml", "--ways", "11"], "--ways: 11-way tasks need at least 11 classes"),
    (["maml", "--holdout", "classes", "--ways", "6"], "--ways: 6-way tasks need at least 6 classes"),
    (["maml", "--holdout", "classes", "--train-classes", "0,1,2,3,5"], "--test-classes: must not share classes"),
    (["maml", "--test-classes", "5,6,7,8,10"], "--test-classes: expected distinct comma-separated digits"),
    (["maml", "--queries", "180"], "a digit class has only 174 examples"),
    (["maml", "--seeds", "-1"], "--seeds: must be positive"),
    (["sine", "--methods", "maml,reptile"], "--methods: expected a comma-separated list of maml, metasgd"),
    (["sine", "--shots", "0"], "--shots: expected positive comma-separated ints"),
    (["sine", "--iterations", "0"], "--iterations: must be positive"),
    (["lr", "--sweep", "0.1,-1"], "--sweep: expected positive comma-separated learning rates"),
    (["lr", "--meta-every", "0"], "--meta-every: must be positive"),
    (["lr", "--sweep", "0.1,1", "--lr", "0.3"], "--lr: not with --sweep"),
    (["nope"], "invalid choice"),
])
def test_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_extras(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import gimli_bptt.experiments as experiments

    real = experiments.importlib.util.find_spec
    monkeypatch.setattr(experiments.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["lr", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "pip install 'gimli_bptt[experiments]'" in err
    assert len(err.splitlines()) == 1, err


def _one_line_error(err: str) -> str:
    """The single stderr line of a command that failed for a reason the user can fix."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["lr", "--epochs", "0"], "gimli-bptt lr: error: argument --epochs: must be positive, got 0"),
    (["maml", "--queries", "180"], "gimli-bptt maml: error: argument --shots/--queries: a digit class has only 174"),
    (["nope"], "gimli-bptt: error: argument command: invalid choice"),
])
def test_a_bad_flag_value_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own errors and the checks after it: one line that names the flag and says where the usage is."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    line = _one_line_error(capsys.readouterr().err)
    assert exc.value.code == 2 and line.startswith(message) and line.endswith("--help)"), line


def test_an_unreadable_run_state_is_one_line(tmp_path: Path, extras: None) -> None:
    """``--resume`` on a corrupt state file: one line naming the file and the fix, status 2, no traceback
    (run as a user runs it, in its own process)."""
    state = tmp_path / "out" / "state" / "fixed-0.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"not a run state")
    done = subprocess.run([sys.executable, "-m", "gimli_bptt", "lr", "--epochs", "1", "--unroll", "1", "--width", "4",
                           "--batch-size", "128", "--seeds", "1", "--no-progress", "--out", str(tmp_path / "out"),
                           "--resume"], capture_output=True, text=True, timeout=600)
    line = _one_line_error(done.stderr)
    assert done.returncode == 2, done.stderr
    assert line.startswith("gimli-bptt lr: error: cannot read the saved run state") and str(state) in line, line
    assert "run without --resume" in line, line


def test_a_missing_optional_package_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An optional package that a subcommand imports and that is not there (here matplotlib, hidden
    after the up-front check): one line naming it and the install command, status 2."""
    import builtins

    import gimli_bptt.__main__ as cli
    import gimli_bptt.experiments as experiments

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    def run_sine(args: Any) -> None:
        import matplotlib.pyplot  # noqa: F401  (what an experiment's plotting does)

    monkeypatch.setattr(experiments, "require_extras", lambda: None)
    monkeypatch.setattr(cli, "_run_sine", run_sine)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["sine", "--iterations", "1"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("gimli-bptt sine: error: the optional package matplotlib is not installed"), line
    assert "pip install 'gimli_bptt[experiments]'" in line, line


class _ReachedTheUpdater(Exception):
    """Raised by the spy in place of :class:`~gimli_bptt.GimliUpdater`: the run stops before any step."""


@pytest.mark.parametrize("command, argv", [
    ("sine", ["--shots", "2", "--iterations", "1", "--meta-batch", "2", "--methods", "maml"]),
    ("clean", ["--train", "50", "--val", "20", "--unroll", "2", "--meta-steps", "1", "--seeds", "1"]),
])
@pytest.mark.parametrize("flag", [True, False])
def test_compile_flag_reaches_the_updater(command: str, argv: list[str], flag: bool, tmp_path: Path, extras: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile`` (one flag shared by ``sine`` and ``clean``) is the updater's ``compile=``; absent, False.
    The spy stops the run at the updater's construction, so nothing compiles."""
    import importlib

    module = importlib.import_module(f"gimli_bptt.experiments.{command}")
    seen: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("compile"))
        raise _ReachedTheUpdater

    monkeypatch.setattr(module, "GimliUpdater", spy)
    with pytest.raises(_ReachedTheUpdater):
        main([command, *argv, "--no-progress", "--out", str(tmp_path)] + (["--compile"] if flag else []))
    assert seen == [flag]


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the errors the user can fix are shortened: any other exception propagates unchanged."""
    import gimli_bptt.__main__ as cli
    import gimli_bptt.experiments as experiments

    def broken(args: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(experiments, "require_extras", lambda: None)
    monkeypatch.setattr(cli, "_run_sine", broken)
    with pytest.raises(ZeroDivisionError):
        main(["sine", "--iterations", "1"])


def test_demo_prints_the_start_the_baseline_and_the_learned_rates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--meta-steps", "2", "--unroll", "2", "--hidden", "8", "--lr", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "fixed rate 0.03 (the baseline)" in out and "meta-learned from 0.03" in out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "4"]  # training steps done: the start and after 2 meta steps of J = 2
    start = rows[0]
    assert start[1] == start[2] and start[3:] == ["0.0300"] * 3  # both from the same weights, every rate the start
    assert "at the fixed rate" in out and "with the learned rates" in out


def test_demo_baseline_is_the_same_training_at_the_fixed_rate() -> None:
    from gimli_bptt.demo import DemoConfig, run_demo

    # A meta step too small to move the rates: both runs are the same training, step for step.
    still = run_demo(DemoConfig(meta_steps=3, unroll=2, hidden=8, meta_lr=1e-12, print_every=1), log=None)
    assert len(still["val_loss"]) == len(still["val_loss_fixed"]) == 4
    assert still["val_loss"][0] == still["val_loss_fixed"][0]
    for learned, fixed in zip(still["val_loss"], still["val_loss_fixed"]):  # float32: rounding only
        assert learned == pytest.approx(fixed, rel=1e-5)
    assert still["val_loss_fixed"][-1] < still["val_loss_fixed"][0]  # it trains
    assert all(r == pytest.approx(0.02, abs=1e-9) for g in range(3) for r in still[f"lr_{g}"])
    # With a real meta step the rates move from the start after the first round, and only then.
    moved = run_demo(DemoConfig(meta_steps=2, unroll=2, hidden=8), log=None)
    assert [moved[f"lr_{g}"][0] for g in range(3)] == [0.02] * 3
    assert all(moved[f"lr_{g}"][1] != 0.02 for g in range(3))
    assert moved["val_loss_fixed"] == pytest.approx(still["val_loss_fixed"][:3], rel=1e-6)  # the same baseline


@pytest.mark.slow
def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "gimli_bptt", "maml", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert done.returncode == 0 and "--meta-steps" in done.stdout


def test_progress_bar_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    with Progress(3, "x", stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with Progress(3, "x", enabled=True, stream=loud) as bar:
        bar.update(3, "done")
    assert "3/3" in loud.getvalue() and "done" in loud.getvalue()


def test_maml_held_out_classes_tiny(tmp_path: Path, extras: None) -> None:
    out = tmp_path / "maml_classes"
    rc = main(["maml", "--holdout", "classes", "--ways", "2", "--shots", "1", "--queries", "2", "--unroll", "1",
               "--meta-steps", "1", "--meta-batch", "1", "--width", "2", "--test-tasks", "2", "--seeds", "1",
               "--optimizer", "sgd", "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "maml.json").read_text())
    assert result["config"]["holdout"] == "classes"
    assert 0.0 <= result["summary"]["sgd"]["1"]["test_acc_mean"] <= 1.0
    assert "held-out classes" in (out / "maml.md").read_text()


@pytest.mark.slow
def test_lr_resumes_bit_identically_after_an_interrupt(tmp_path: Path, extras: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted in epoch 3 of the meta variant, resumed with --resume: the same numbers as a
    straight run. The state is saved atomically after every epoch, so only epoch 3 is redone."""
    import gimli_bptt.experiments.lr as lr_mod

    args = ["lr", "--epochs", "3", "--unroll", "2", "--width", "4", "--batch-size", "128", "--seeds", "1",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "lr.json").read_text())

    calls = {"n": 0}
    real_evaluate = lr_mod.evaluate

    def interrupting_evaluate(model: Any, data: Any) -> Any:
        calls["n"] += 1
        # evaluations: initial + 3 epochs per variant; the meta variant is the third
        if calls["n"] == 2 * 4 + 1 + 3:
            raise KeyboardInterrupt
        return real_evaluate(model, data)

    monkeypatch.setattr(lr_mod, "evaluate", interrupting_evaluate)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed")])
    saved = torch.load(tmp_path / "resumed" / "state" / "meta-0.pt", weights_only=True)
    assert saved["epoch"] == 2
    assert not list((tmp_path / "resumed" / "state").glob(".*.tmp"))  # no temporary left behind
    monkeypatch.setattr(lr_mod, "evaluate", real_evaluate)
    assert main(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "lr.json").read_text())
    for variant in ("fixed", "multistep", "meta"):
        a, b = straight["runs"][variant][0], resumed["runs"][variant][0]
        for key in ("test_acc", "test_loss", "train_loss", "rates", "val_loss", "hypergrad_lr"):
            assert a[key] == b[key], (variant, key)


@pytest.mark.slow
def test_lr_under_torchrun_with_two_ranks(tmp_path: Path, extras: None) -> None:
    """gimli-bptt lr under torchrun --nproc_per_node=2 (gloo on loopback): rank 0 writes the outputs."""
    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "lr2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gimli_bptt", "lr", "--epochs", "1", "--unroll", "2", "--width", "4", "--batch-size", "128",
           "--seeds", "1", "--no-progress", "--dist-timeout", "120", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "GIMLI_DIST_BACKEND": "gloo"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "lr.json").read_text())
    assert result["world_size"] == 2
    assert all(math.isfinite(x) for x in _numbers(result))
    assert result["runs"]["meta"][0]["rates"][-1] != result["runs"]["meta"][0]["initial_rates"]


SINE_TINY = ["sine", "--shots", "2,3", "--iterations", "3", "--meta-batch", "4", "--test-tasks", "10",
             "--test-steps", "2", "--seeds", "1", "--no-progress"]


def test_sine_tiny(tmp_path: Path, extras: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sine"
    assert main(SINE_TINY + ["--methods", "maml,metasgd,maml-adam,fomaml", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("sine: 8 runs, ") and "3-shot test MSE" in printed[-1]  # the one-line summary
    result = json.loads((out / "sine.json").read_text())
    assert all(math.isfinite(x) for x in _numbers({k: v for k, v in result.items() if k != "summary"}))
    assert len(result["runs"]) == 4 * 2
    for run in result["runs"]:
        assert len(run["test"]["mse"]) == 3 and run["test_mse"] == run["test"]["mse"][1]  # scored after J = 1
        assert len(run["examples"]["after"]) == 3
    s = result["summary"]
    assert s["maml"]["2"]["published_mse"] is None and s["fomaml"]["3"]["published_mse"] is None
    metasgd = next(r for r in result["runs"] if r["method"] == "metasgd")
    assert set(metasgd["learned"]) == {"lr"} and all(v["min"] >= 0 for v in metasgd["learned"]["lr"].values())
    adam = next(r for r in result["runs"] if r["method"] == "maml-adam")
    assert set(adam["learned"]) == {"lr", "beta1", "beta2"}
    table = (out / "sine.md").read_text()
    assert "2-shot: published" in table and "Li et al. 2017" in table and "Protocol:" in table
    _check_png(out / "sine_steps.png")
    _check_png(out / "sine_tasks.png")


def test_sine_published_numbers_at_the_papers_shots(tmp_path: Path, extras: None) -> None:
    out = tmp_path / "sine5"
    argv = ["sine", "--shots", "5", "--iterations", "1", "--meta-batch", "2", "--test-tasks", "4", "--test-steps", "1",
            "--methods", "maml,metasgd", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    s = json.loads((out / "sine.json").read_text())["summary"]
    assert (s["maml"]["5"]["published_mse"], s["metasgd"]["5"]["published_mse"]) == (1.13, 0.90)
    # J = 2 is not the papers' setting: nothing to compare with
    assert main(argv + ["--unroll", "2", "--out", str(tmp_path / "sine5j2")]) == 0
    s = json.loads((tmp_path / "sine5j2" / "sine.json").read_text())["summary"]
    assert s["maml"]["5"]["published_mse"] is None


@pytest.mark.slow
def test_sine_resumes_bit_identically_after_an_interrupt(tmp_path: Path, extras: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted during the second run, resumed with --resume: the same numbers as a straight
    run; the first run is not run again and the second continues from its last saved state."""
    import gimli_bptt.experiments.sine as sine_mod

    args = SINE_TINY + ["--iterations", "5", "--save-every", "2", "--shots", "2", "--methods", "maml,metasgd"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "sine.json").read_text())

    calls = {"n": 0}
    real = sine_mod.sample_tasks

    def interrupting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5 + 4:  # the first run's 5 iterations, then the 4th iteration of the second
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sine_mod, "sample_tasks", interrupting)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed")])
    saved = torch.load(tmp_path / "resumed" / "state" / "metasgd-2shot-0.pt", weights_only=True)
    assert saved["iteration"] == 2 and not saved["done"]
    monkeypatch.setattr(sine_mod, "sample_tasks", real)
    assert main(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "sine.json").read_text())
    for a, b in zip(straight["runs"], resumed["runs"]):
        for key in ("query_loss", "test", "learned", "examples"):
            assert a[key] == b[key], (a["method"], key)


def test_sine_evaluation_matches_the_updaters_inner_loop(extras: None) -> None:
    """The test-time adaptation (vmapped SGD and Adam with the learned values) gives the query
    losses the updater's own inner loop gives, for every method, after meta steps moved them."""
    from gimli_bptt.experiments.sine import METHODS, SineConfig, adapt, build, sample_tasks, task_mse

    for method in METHODS:
        cfg = SineConfig(meta_batch=3, unroll=2)
        model, updater = build(method, cfg, seed=0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            tasks = sample_tasks(3, 4, gen)
            updater.step([tasks.support] * 2, tasks.query)
        tasks = sample_tasks(3, 4, gen)
        ref = updater.hypergradient([tasks.support] * 2, tasks.query).task_val_losses
        ours = task_mse(model, adapt(updater, tasks.support, 2)[2], tasks.query)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


LR_TINY = ["lr", "--epochs", "2", "--unroll", "2", "--width", "2", "--batch-size", "256", "--seeds", "1",
           "--no-progress"]


@pytest.mark.slow
def test_lr_sweep_tiny(tmp_path: Path, extras: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    assert main(LR_TINY + ["--seeds", "2", "--sweep", "0.03,0.3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("lr sweep: done in ")
    result = json.loads((out / "lr_sweep.json").read_text())
    assert set(result["runs"]) == {"0.03", "0.3"} and result["worst_start"] in ("0.03", "0.3")
    for rate, by_variant in result["runs"].items():
        assert set(by_variant) == {"fixed", "meta"}
        for variant, runs in by_variant.items():
            assert [r["seed"] for r in runs] == [0, 1]
            assert runs[0]["initial_rates"] == [float(rate)] * len(runs[0]["group_names"])  # the same start
        assert by_variant["fixed"][0]["rates"][-1] == [float(rate)] * len(by_variant["fixed"][0]["group_names"])
    assert result["config"]["meta_lr"] is None  # each start's meta lr is its rate / 10
    assert "| 0.03 |" in (out / "lr_sweep.md").read_text()
    _check_png(out / "lr_sweep.png")
    _check_png(out / "lr_sweep_worst.png")


def test_lr_sweep_default_rates_and_epochs() -> None:
    from gimli_bptt.__main__ import SWEEP_EPOCHS, build_parser

    args = build_parser().parse_args(["lr", "--sweep"])
    assert args.sweep == [0.01, 0.03, 0.1, 0.3, 1.0] and args.epochs is None and SWEEP_EPOCHS == 10
    assert build_parser().parse_args(["lr"]).sweep is None


@pytest.mark.slow
def test_lr_meta_every_tiny(tmp_path: Path, extras: None) -> None:
    """--meta-every 2: a meta step after every second training step (the meta variant trains on
    1259 images: 4 steps of 256 per epoch, 8 in two epochs), against one per epoch by default."""
    assert main(LR_TINY + ["--meta-every", "2", "--out", str(tmp_path / "every")]) == 0
    meta = json.loads((tmp_path / "every" / "lr.json").read_text())["runs"]["meta"][0]
    assert meta["meta_step_at"] == [2, 4, 6, 8] and len(meta["val_loss"]) + meta["skipped_meta_steps"] == 4
    assert main(LR_TINY + ["--out", str(tmp_path / "epoch")]) == 0
    meta = json.loads((tmp_path / "epoch" / "lr.json").read_text())["runs"]["meta"][0]
    assert meta["meta_step_at"] == [4, 8] and len(meta["val_loss"]) + meta["skipped_meta_steps"] == 2


@pytest.mark.slow
def test_lr_divergence_is_recorded(tmp_path: Path, extras: None) -> None:
    """A far too large rate: the run stops when its weights become non-finite, says from which
    epoch, and the outputs stay finite JSON."""
    out = tmp_path / "diverge"
    assert main(LR_TINY + ["--lr", "1e6", "--epochs", "2", "--out", str(out)]) == 0
    result = json.loads((out / "lr.json").read_text())
    fixed = result["runs"]["fixed"][0]
    assert fixed["diverged_epoch"] == 1 and fixed["test_loss"] == [None, None]
    assert result["summary"]["fixed"]["diverged"] == 1


def test_maml_states_its_protocol_and_records_the_curve(tmp_path: Path, extras: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "maml_curve"
    rc = main(["maml", "--holdout", "classes", "--ways", "2", "--shots", "1", "--queries", "2", "--unroll", "1",
               "--meta-steps", "3", "--meta-batch", "1", "--width", "2", "--test-tasks", "2", "--seeds", "1",
               "--optimizer", "sgd", "--eval-every", "2", "--fixed-rates", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("Protocol: held-out CLASSES") and printed[-1].startswith("maml: done in ")
    result = json.loads((out / "maml.json").read_text())
    run = result["runs"][0]
    assert run["curve"]["meta_step"] == [0, 2, 3] and len(run["curve"]["seen_acc"]) == 3
    assert run["values"] == {} and result["config"]["learn_rates"] is False
    md = (out / "maml.md").read_text()
    assert "SGD (fixed rates)" in md and "seen classes" in md and "Protocol: held-out CLASSES" in md
    assert not (out / "maml_rates_sgd.png").exists()
    default = build_parser_defaults()
    assert default.holdout == "samples"


def build_parser_defaults() -> Any:
    from gimli_bptt.__main__ import build_parser

    return build_parser().parse_args(["maml"])


def test_sine_curve_keeps_diverged_steps_as_null() -> None:
    """Rates learned for one step can diverge when stepped further at test time (Meta-SGD does):
    those points are None in sine.json, not NaN."""
    from gimli_bptt.experiments.sine import sanitize_curve

    curve = sanitize_curve({"mse": [2.0, 0.5, float("inf"), float("nan")], "ci95": [0.1, 0.05, float("nan"), 0.3]})
    assert curve == {"mse": [2.0, 0.5, None, None], "ci95": [0.1, 0.05, None, None]}


@pytest.mark.slow
def test_maml_resumes_bit_identically_after_an_interrupt(tmp_path: Path, extras: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted in the second run's fourth meta step, resumed with --resume: the same numbers as
    a straight run (the first run is not run again, the second continues from meta step 2)."""
    import gimli_bptt.experiments.maml as maml_mod

    args = ["maml", "--ways", "2", "--shots", "1,2", "--queries", "2", "--unroll", "1", "--meta-steps", "4",
            "--meta-batch", "1", "--width", "2", "--test-tasks", "2", "--seeds", "1", "--optimizer", "adam",
            "--save-every", "2", "--eval-every", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "maml.json").read_text())

    calls = {"n": 0}
    real = maml_mod.apply_hypergradients

    def interrupting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4 + 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(maml_mod, "apply_hypergradients", interrupting)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed")])
    saved = torch.load(tmp_path / "resumed" / "state" / "adam-2shot-0.pt", weights_only=True)
    assert saved["meta_step"] == 2 and not saved["done"]
    monkeypatch.setattr(maml_mod, "apply_hypergradients", real)
    assert main(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "maml.json").read_text())
    for a, b in zip(straight["runs"], resumed["runs"]):
        for key in ("query_loss", "values", "curve", "test_acc"):
            assert a[key] == b[key], (a["shots"], key)
