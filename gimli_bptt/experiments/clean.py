# SPDX-License-Identifier: Apache-2.0
"""``gimli-bptt clean``: data hyper-cleaning, one learned weight per training example (Franceschi et al., 2017)."""
from __future__ import annotations

import functools
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import Progress
from ..updater import GimliUpdater
from .data import Batch, corrupt_labels, load_digits_tensors
from .report import check_finite, mean_std
from .runstate import load, save_atomic

MODELS = ("linear", "mlp")
ROWS = ("baseline", "oracle", "cleaned")
DEFAULT_LR = {"sgd": 1.0, "adam": 0.01}  # any other optimizer: FALLBACK_LR unless --lr says
FALLBACK_LR = 0.01
NUM_CLASSES = 10


@dataclass
class CleanConfig:
    """Settings of :func:`run_clean` (the flags of ``gimli-bptt clean``).

    Attributes:
        train: Training examples (their labels are corrupted).
        val: Clean validation examples (the meta objective).
        noise: Fraction of the training labels replaced by a different class.
        model: ``"linear"`` (softmax regression, from zero weights) or ``"mlp"``
            (64-``hidden``-10 with tanh, from the seed's default initialisation).
        hidden: Hidden width of the MLP.
        unroll: J, full-batch inner steps from the fixed initial point.
        optimizer: The inner ``torch.optim`` optimizer, by name (``sgd``, ``adam``, ``rmsprop``, ...).
        lr: Its learning rate (``None``: 1.0 for SGD, 0.01 for Adam and the others).
        weight_decay: Its weight decay (an L2 on the model).
        meta_lr: Learning rate of the Adam meta optimizer on the per-example logits.
        meta_steps: Meta updates per run; each one unrolls J steps from the initial point.
        init_logit: Initial logit of every example weight (0: weight 0.5, the same training
            as the baseline's, since the loss is the weighted *mean*).
        threshold: An example is flagged as corrupted when its learned weight is below this.
        hypergradients: The hypergradients to run, each a row of the comparison table:
            ``"exact"``, ``"first-order"`` or ``"truncate:K"``; the first gives the main table.
        eval_every: Meta steps between the retrainings that record validation and test
            accuracy for the curves plot (the last meta step is always recorded).
        seeds: Seeds (each draws the split, the corruption and the MLP's initial weights).
        device: Torch device.
        threads: CPU threads of torch.
        out: Output folder.
        progress: Progress bar (``None``: only when stderr is a terminal).
        resume: Continue from the states saved in ``out/state/``.
        save_every: Meta steps between saved run states.
        compile: ``GimliUpdater(compile=True)``: each inner and reverse step as one compiled graph
            (the first meta step of each run compiles them).
    """

    train: int = 800
    val: int = 200
    noise: float = 0.5
    model: str = "linear"
    hidden: int = 32
    unroll: int = 100
    optimizer: str = "sgd"
    lr: Optional[float] = None
    weight_decay: float = 0.0
    meta_lr: float = 0.1
    meta_steps: int = 100
    init_logit: float = 0.0
    threshold: float = 0.5
    hypergradients: list[str] = field(default_factory=lambda: ["exact"])
    eval_every: int = 5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/clean"
    progress: Optional[bool] = None
    resume: bool = False
    save_every: int = 25
    compile: bool = False

    def resolved(self) -> "CleanConfig":
        """A copy with the optimizer's default learning rate filled in, every setting checked."""
        optimizer_class(self.optimizer)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1 (a weight is a sigmoid), got {self.threshold}")
        for name in self.hypergradients:
            hypergradient_options(name, self.unroll)
        lr = DEFAULT_LR.get(self.optimizer.lower(), FALLBACK_LR) if self.lr is None else self.lr
        return CleanConfig(**{**asdict(self), "lr": lr})


def optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The ``torch.optim`` class named ``name`` (case-insensitive), which gimli_bptt must support."""
    from ..optim import supported_optimizers

    by_lower = {n.lower(): n for n in supported_optimizers()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(sorted(by_lower))}")
    return getattr(torch.optim, by_lower[name.lower()])  # type: ignore[no-any-return]


def hypergradient_options(name: str, unroll: Optional[int]) -> dict[str, Any]:
    """The ``GimliUpdater`` options of a hypergradient: ``exact`` ({}), ``first-order``
    (``first_order=True``) or ``truncate:K`` (``truncate=K``, 1 ≤ K ≤ J; with ``unroll=None``
    only K ≥ 1 is checked)."""
    if name == "exact":
        return {}
    if name == "first-order":
        return {"first_order": True}
    if name.startswith("truncate:"):
        try:
            k = int(name.split(":", 1)[1])
        except ValueError:
            k = 0
        if unroll is None and k < 1:
            raise ValueError(f"hypergradient {name!r}: K must be a positive int")
        if unroll is not None and not 1 <= k <= unroll:
            raise ValueError(f"hypergradient {name!r}: K must be an int between 1 and J = {unroll}")
        return {"truncate": k}
    raise ValueError(f"unknown hypergradient {name!r}: use exact, first-order or truncate:K")


@dataclass
class NoisyDigits:
    """A training split with corrupted labels, a clean validation split and a clean test split."""

    train: Batch          # inputs and the *noisy* labels
    true_train: Tensor    # the training split's true labels
    corrupted: Tensor     # bool mask of the corrupted training examples
    val: Batch
    test: Batch


def noisy_digits(x: Tensor, y: Tensor, seed: int, train: int, val: int, noise: float) -> NoisyDigits:
    """Splits the digits at random into ``train``, ``val`` and test (the rest), and corrupts a
    fraction ``noise`` of the training labels (:func:`~gimli_bptt.experiments.data.corrupt_labels`)."""
    if train + val >= len(y):
        raise ValueError(f"train + val = {train + val} leaves no test examples of the {len(y)} digits")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen).to(x.device)
    tr, va, te = perm[:train], perm[train:train + val], perm[train + val:]
    noisy, corrupted = corrupt_labels(y[tr], noise, gen, NUM_CLASSES)
    flat = x.flatten(1)
    return NoisyDigits((flat[tr], noisy), y[tr], corrupted, (flat[va], y[va]), (flat[te], y[te]))


def make_model(kind: str, hidden: int, seed: int, in_dim: int = 64) -> nn.Module:
    """The fixed initial point θ_0: softmax regression from zeros, or the seed's MLP."""
    torch.manual_seed(seed)
    if kind == "linear":
        model: nn.Module = nn.Linear(in_dim, NUM_CLASSES)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES))


def weighted_loss(model: Any, batch: Batch, weights: Tensor) -> Tensor:
    """ℓ^train(θ, φ_loss): the weighted mean Σ w_i ℓ_i / Σ w_i of the per-example cross-entropies."""
    x, y = batch
    losses = F.cross_entropy(model(x), y, reduction="none")
    return (weights * losses).sum() / weights.sum()


def val_loss(model: Any, batch: Batch) -> Tensor:
    """L^val: the plain mean cross-entropy on the clean validation split."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def _make_opt(cfg: CleanConfig, params: Any) -> torch.optim.Optimizer:
    return optimizer_class(cfg.optimizer)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_weighted(cfg: CleanConfig, init: dict[str, Tensor], data: NoisyDigits, weights: Tensor) -> nn.Module:
    """J full-batch steps of plain ``torch.optim`` training from ``init`` on the weighted noisy loss.

    The same inner loop the meta step unrolls ([Alg.1 L4]-[Alg.1 L7]), here without a tape: it
    gives the baseline (all weights 1), the oracle (weight 1 on the clean examples, 0 on the
    corrupted ones) and the hyper-cleaned model (the learned weights).
    """
    model = make_model(cfg.model, cfg.hidden, 0).to(data.train[0].device)
    model.load_state_dict(init)
    opt = _make_opt(cfg, model.parameters())
    w = weights.detach()
    with torch.enable_grad():
        for _ in range(cfg.unroll):
            opt.zero_grad(set_to_none=True)
            weighted_loss(model, data.train, w).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: Batch) -> float:
    """The fraction of ``data`` that ``model`` classifies correctly."""
    x, y = data
    return float((model(x).argmax(1) == y).float().mean())


def f1_corrupted(weights: Tensor, corrupted: Tensor, threshold: float) -> dict[str, float]:
    """Detection of the corrupted examples by ``weight < threshold``: precision, recall and F1."""
    flagged = weights < threshold
    tp = int((flagged & corrupted).sum())
    fp = int((flagged & ~corrupted).sum())
    fn = int((~flagged & corrupted).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1}


def clean_one(cfg: CleanConfig, data: NoisyDigits, seed: int, hypergradient: str, bar: Optional[Progress] = None,
              state_path: Optional[Path] = None) -> dict[str, Any]:
    """Learns the per-example weights of one seed with one hypergradient, then retrains with them.

    φ_loss is one logit per training example, the weight its sigmoid (bounded in (0, 1)).
    Each meta step is one :meth:`GimliUpdater.step` ([Alg.1 L2]-[Alg.1 L16]): J full-batch
    steps of the weighted training loss from the fixed initial point θ_0 (``commit=False``, so
    θ_0 never moves), the clean validation loss at θ'_J, its exact gradient with respect to all
    logits (or the approximation ``hypergradient`` names), and one Adam step on them. Every
    ``cfg.eval_every`` meta steps the weights are scored by retraining from θ_0
    (:func:`train_weighted`): validation and test accuracy, for the curves plot only.

    With ``state_path`` the run's state (the logits, the updater and its meta optimizer, the
    record) is saved atomically every ``cfg.save_every`` meta steps and at the end; with
    ``cfg.resume`` the run continues from it, and a finished run is not run again.
    """
    model = make_model(cfg.model, cfg.hidden, seed).to(data.train[0].device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _make_opt(cfg, model.parameters())
    logits = torch.full((len(data.train[1]),), cfg.init_logit, device=data.train[0].device, requires_grad=True)
    updater = GimliUpdater(model, opt, lambda m, b: weighted_loss(m, b, torch.sigmoid(logits)), val_loss,
                           unroll=cfg.unroll, loss_params={"logits": logits},
                           meta_opt=functools.partial(torch.optim.Adam, lr=cfg.meta_lr), progress=False,
                           compile=cfg.compile, **hypergradient_options(hypergradient, cfg.unroll))
    rec: dict[str, Any] = {"hypergradient": hypergradient, "seed": seed, "val_loss": [], "eval_step": [],
                           "val_acc": [], "test_acc": [], "seconds": 0.0, "cpu_seconds": 0.0}
    first = 0
    saved = load(state_path, progress_key="meta_step") if (state_path is not None and cfg.resume) else None
    if saved is not None:
        if saved.get("done"):
            if bar is not None:
                bar.update(cfg.meta_steps, f"{hypergradient} seed {seed}: finished before")
            return saved["rec"]  # type: ignore[no-any-return]
        updater.load_state_dict(saved["updater"])
        rec, first = saved["rec"], int(saved["meta_step"])
        if bar is not None:
            bar.update(first, f"{hypergradient} seed {seed}: resumed at meta step {first}")

    def save(step: int, done: bool = False) -> None:
        if state_path is not None:
            save_atomic({"meta_step": step, "done": done, "updater": updater.state_dict(), "rec": rec}, state_path)

    def score(step: int) -> None:
        trained = train_weighted(cfg, init, data, torch.sigmoid(logits.detach()))
        rec["eval_step"].append(step)
        rec["val_acc"].append(accuracy(trained, data.val))
        rec["test_acc"].append(accuracy(trained, data.test))

    if first == 0:
        score(0)
    start = time.perf_counter() - rec["seconds"]
    cpu_start = time.process_time() - rec["cpu_seconds"]
    train_batches = [data.train] * cfg.unroll
    for step in range(first, cfg.meta_steps):
        result = updater.step(train_batches, data.val)
        rec["val_loss"].append(float(result.val_loss))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.meta_steps:
            score(step + 1)
        rec["seconds"] = time.perf_counter() - start
        rec["cpu_seconds"] = time.process_time() - cpu_start
        if bar is not None:
            bar.update(1, f"{hypergradient} seed {seed} val loss {rec['val_loss'][-1]:.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.meta_steps:
            save(step + 1)
    weights = torch.sigmoid(logits.detach())
    cleaned = train_weighted(cfg, init, data, weights)
    rec["cleaned"] = accuracy(cleaned, data.test)
    rec.update(f1_corrupted(weights, data.corrupted, cfg.threshold))
    rec["weights"] = weights.cpu().tolist()
    rec["corrupted"] = data.corrupted.cpu().tolist()
    stats = updater.last_tape_stats
    rec["tape"] = None if stats is None else {"schedule": stats.schedule, "graphs_kept": stats.graphs_kept,
                                              "max_slots_used": stats.max_slots_used,
                                              "forward_steps": stats.forward_steps}
    rec["seconds"] = time.perf_counter() - start
    rec["cpu_seconds"] = time.process_time() - cpu_start
    save(cfg.meta_steps, done=True)
    return rec


def baselines(cfg: CleanConfig, data: NoisyDigits, seed: int) -> dict[str, float]:
    """Test accuracy of the baseline (every weight 1, noisy labels) and the oracle (clean examples only)."""
    model = make_model(cfg.model, cfg.hidden, seed).to(data.train[0].device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ones = torch.ones(len(data.train[1]), device=data.train[0].device)
    return {"baseline": accuracy(train_weighted(cfg, init, data, ones), data.test),
            "oracle": accuracy(train_weighted(cfg, init, data, (~data.corrupted).float()), data.test)}


def summarize(per_seed: list[dict[str, float]], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and std over seeds: the baseline and oracle rows, and per hypergradient the cleaned
    accuracy, the F1 (and its precision and recall) and the seconds of meta-training per seed."""
    def ms(values: list[float]) -> dict[str, float]:
        m, s = mean_std(values)
        return {"mean": m, "std": s}

    out: dict[str, Any] = {row: ms([r[row] for r in per_seed]) for row in ("baseline", "oracle")}
    out["hypergradients"] = {
        name: {key: ms([r[key] for r in recs])
               for key in ("cleaned", "f1", "precision", "recall", "seconds", "cpu_seconds")}
        for name, recs in runs.items()}
    return out


def main_table(summary: dict[str, Any], first: str) -> str:
    """The three rows and the detection F1 as Markdown."""
    h = summary["hypergradients"][first]
    pct = lambda d: f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}%"  # noqa: E731
    return "\n".join([
        "| training set | test accuracy |",
        "| --- | --- |",
        f"| baseline: all examples, noisy labels | {pct(summary['baseline'])} |",
        f"| oracle: the clean examples only | {pct(summary['oracle'])} |",
        f"| hyper-cleaned: learned weights ({first} hypergradient) | {pct(h['cleaned'])} |",
        "",
        f"Detection of the corrupted examples (weight < threshold): F1 {h['f1']['mean']:.3f} ± {h['f1']['std']:.3f} "
        f"(precision {h['precision']['mean']:.3f}, recall {h['recall']['mean']:.3f}).",
    ]) + "\n"


def hypergradient_table(summary: dict[str, Any]) -> str:
    """One row per hypergradient: cleaned accuracy, F1 and meta-training seconds per seed (wall and CPU)."""
    lines = ["| hypergradient | hyper-cleaned test accuracy | F1 | meta-training s per seed (wall / CPU) |",
             "| --- | --- | --- | --- |"]
    for name, h in summary["hypergradients"].items():
        lines.append(f"| {name} | {100 * h['cleaned']['mean']:.2f} ± {100 * h['cleaned']['std']:.2f}% | "
                     f"{h['f1']['mean']:.3f} ± {h['f1']['std']:.3f} | "
                     f"{h['seconds']['mean']:.1f} / {h['cpu_seconds']['mean']:.1f} |")
    return "\n".join(lines) + "\n"


def run_clean(cfg: CleanConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Runs every seed (baseline, oracle, and the hyper-cleaning of every hypergradient) and
    writes ``clean.md``, ``clean.json``, ``clean_weights.png`` and ``clean_curves.png`` into ``cfg.out``.

    Returns:
        The content of ``clean.json``: ``baseline``, ``oracle``, ``cleaned`` and ``f1`` as
        ``{"mean", "std"}`` over the seeds (accuracies as fractions; ``cleaned`` and ``f1`` of
        the first hypergradient), the summary of every hypergradient, the configuration and
        every run's record.
    """
    from .plots import plot_clean_curves, plot_clean_weights

    cfg = cfg.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    x, y = load_digits_tensors(cfg.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    if log:
        log(f"clean: {cfg.train} training digits, {100 * cfg.noise:g}% of their labels corrupted, {cfg.val} clean "
            f"validation digits; {cfg.model} model, J={cfg.unroll} full-batch {cfg.optimizer} steps (lr {cfg.lr:g}), "
            f"{cfg.meta_steps} meta steps, hypergradient {', '.join(cfg.hypergradients)}, seeds {cfg.seeds}")
    per_seed: list[dict[str, float]] = []
    runs: dict[str, list[dict[str, Any]]] = {h: [] for h in cfg.hypergradients}
    with Progress(len(cfg.seeds) * len(cfg.hypergradients) * cfg.meta_steps, "clean", enabled=cfg.progress) as bar:
        for seed in cfg.seeds:
            data = noisy_digits(x, y, seed, cfg.train, cfg.val, cfg.noise)
            per_seed.append({"seed": seed, **baselines(cfg, data, seed)})
            for h in cfg.hypergradients:
                slug = h.replace(":", "")
                runs[h].append(clean_one(cfg, data, seed, h, bar, state_path=out / "state" / f"{slug}-{seed}.pt"))
    summary = summarize(per_seed, runs)
    first = cfg.hypergradients[0]
    result: dict[str, Any] = {
        "command": "clean",
        "baseline": summary["baseline"],
        "oracle": summary["oracle"],
        "cleaned": summary["hypergradients"][first]["cleaned"],
        "f1": summary["hypergradients"][first]["f1"],
        "threshold": cfg.threshold,
        "config": asdict(cfg),
        "data": {"train": cfg.train, "val": cfg.val, "test": len(y) - cfg.train - cfg.val,
                 "corrupted": int(round(cfg.noise * cfg.train))},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "summary": summary,
        "per_seed": per_seed,
        "runs": runs,
    }
    check_finite(result)
    (out / "clean.json").write_text(json.dumps(result, indent=1))
    table = main_table(summary, first)
    md = ["# Data hyper-cleaning on the digits\n",
          f"{cfg.train} training digits with {100 * cfg.noise:g}% of their labels replaced by a different class, "
          f"{cfg.val} clean validation digits, {len(y) - cfg.train - cfg.val} test digits; {cfg.model} model "
          f"trained by J = {cfg.unroll} full-batch {cfg.optimizer} steps (lr {cfg.lr:g}) from a fixed initial "
          "point; one weight per "
          f"training example (the sigmoid of a logit, learned by Adam, lr {cfg.meta_lr:g}, over {cfg.meta_steps} meta "
          f"steps). Test accuracy, mean ± std over seeds {cfg.seeds}.\n", table,
          f"An example is flagged as corrupted when its learned weight is below {cfg.threshold:g}; every weight starts "
          f"at {1 / (1 + math.exp(-cfg.init_logit)):.3g}.\n"]
    if len(cfg.hypergradients) > 1:
        md += ["## Which hypergradient\n", hypergradient_table(summary)]
    (out / "clean.md").write_text("\n".join(md))
    plot_clean_weights(runs[first], out / "clean_weights.png", cfg.threshold)
    plot_clean_curves(runs, per_seed, out / "clean_curves.png")
    if log:
        log(table.rstrip())
        if len(cfg.hypergradients) > 1:
            log(hypergradient_table(summary).rstrip())
        s = summary
        log(f"clean: done in {result['seconds']:.1f} s; test accuracy baseline {100 * s['baseline']['mean']:.2f}%, "
            f"oracle {100 * s['oracle']['mean']:.2f}%, hyper-cleaned {100 * result['cleaned']['mean']:.2f}% (mean of "
            f"{len(cfg.seeds)} seeds), F1 {result['f1']['mean']:.3f}; wrote {out / 'clean.md'}, {out / 'clean.json'}, "
            f"{out / 'clean_weights.png'}, {out / 'clean_curves.png'}")
    return result


__all__ = ["CleanConfig", "MODELS", "NoisyDigits", "accuracy", "baselines", "clean_one", "f1_corrupted",
           "hypergradient_options", "hypergradient_table", "main_table", "make_model", "noisy_digits",
           "optimizer_class", "run_clean", "summarize", "train_weighted", "val_loss", "weighted_loss"]
