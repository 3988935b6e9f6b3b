# SPDX-License-Identifier: Apache-2.0
"""``gimli-bptt lr``: fixed rate vs multi-step annealing vs meta-learned per-group rates (paper Section 5.1)."""
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
from torch import nn

from ..updater import GimliUpdater
from .data import Batch, Splits, load_digits_tensors, minibatches, sample_batches, split_digits
from .models import cross_entropy, make_convnet, per_tensor_groups
from ..progress import Progress
from .report import check_finite, mean_std
from .runstate import load, save_atomic

VARIANTS = ("fixed", "multistep", "meta")
DEFAULT_LR = {"sgd": 0.1, "adam": 0.003}


@dataclass
class LRConfig:
    """Settings of :func:`run_lr` (the flags of ``gimli-bptt lr``).

    Attributes:
        epochs: Training epochs of every variant.
        unroll: J, inner steps unrolled at each epoch's meta step.
        width: Channels of the conv net's first block (model size).
        optimizer: Inner optimizer, ``"sgd"`` (momentum 0.9) or ``"adam"``.
        lr: Initial learning rate of every group (``None``: 0.1 for SGD, 0.003 for Adam).
        meta_lr: Learning rate of the Adam meta optimizer (``None``: ``lr / 10``).
        weight_decay: Weight decay of the inner optimizer.
        batch_size: Minibatch size of real training.
        meta_batch_size: Minibatch size of the J unrolled steps (the paper uses 16 against 64).
        milestones: Epoch fractions where the multi-step schedule divides the rate by 10.
        val_frac, test_frac: Fractions of every class held out for validation and test.
        seeds: Seeds to run (each seeds the split, the initial weights and the batch order).
        device: Torch device.
        threads: CPU threads of torch (1 is fastest for this small net, and with other load).
        out: Output folder.
        progress: Progress bars (``None``: on a terminal or in a Jupyter notebook, not in a log).
        resume: Continue from the state saved in ``out/state/`` (saved atomically after every
            epoch of every run), so an interrupted run loses at most the current epoch.
        meta_every: ``None`` (default): one meta step after every epoch. N: a meta step after
            every N real training steps instead (counted across epochs).
    """

    epochs: int = 20
    unroll: int = 15
    width: int = 16
    optimizer: str = "sgd"
    lr: Optional[float] = None
    meta_lr: Optional[float] = None
    weight_decay: float = 1e-4
    batch_size: int = 32
    meta_batch_size: int = 16
    milestones: tuple[float, float] = (0.5, 0.75)
    val_frac: float = 0.1
    test_frac: float = 0.2
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/lr"
    progress: Optional[bool] = None
    resume: bool = False
    meta_every: Optional[int] = None

    def resolved(self) -> "LRConfig":
        """A copy with the optimizer-dependent defaults filled in."""
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of {sorted(DEFAULT_LR)}")
        lr = DEFAULT_LR[self.optimizer] if self.lr is None else self.lr
        meta_lr = lr / 10 if self.meta_lr is None else self.meta_lr
        return LRConfig(**{**asdict(self), "lr": lr, "meta_lr": meta_lr, "milestones": tuple(self.milestones)})


def _make_opt(cfg: LRConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    assert cfg.lr is not None, "takes a resolved config (LRConfig.resolved)"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` in eval mode on ``data``."""
    was_training = model.training
    model.eval()
    x, y = data
    logits = model(x)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    model.train(was_training)
    return loss, acc


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> float:
    opt.zero_grad(set_to_none=True)
    loss = cross_entropy(model, batch)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_variant(variant: str, cfg: LRConfig, splits: Splits, seed: int,
                  bar: Optional[Progress] = None, state_path: Optional[Path] = None) -> dict[str, Any]:
    """Trains one variant from the seed's initial weights and returns its per-epoch record.

    * ``fixed``: the initial rate throughout; trains on train + validation splits.
    * ``multistep``: ``MultiStepLR``, rate / 10 at each milestone; trains on train + validation.
    * ``meta``: trains on the train split only; after every epoch one meta step
      (:meth:`GimliUpdater.step`, ``commit=False``): J unrolled steps from the current weights
      and optimizer state on fresh training minibatches, the loss on the whole validation split
      at θ'_J, and one Adam step on the per-group rates, which are written into
      ``opt.param_groups`` and used by the next epoch. The unroll only measures; the real
      training steps are the same number as the baselines'. With ``cfg.meta_every = N`` the
      meta step comes after every N-th real training step instead (counted across epochs).

    A run whose loss or weights become non-finite (a rate far too large) has diverged: it stops, its
    record says from which epoch (``diverged_epoch``), and the remaining epochs keep the
    diverged model's test accuracy with a ``None`` loss. A meta step whose unroll or
    hypergradient is non-finite is skipped and counted (``skipped_meta_steps``).

    With ``state_path``, everything the next epoch depends on (weights, optimizer, schedule,
    updater, generators, the record so far) is saved there atomically after every epoch, and
    with ``cfg.resume`` training continues from it: bit-identically to an uninterrupted run.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    torch.manual_seed(seed)
    model = make_convnet(cfg.width).to(cfg.device)
    groups, names = per_tensor_groups(model)
    opt = _make_opt(cfg, groups)
    data_gen = torch.Generator().manual_seed(seed + 1)
    meta_gen = torch.Generator().manual_seed(seed + 2)
    if variant == "meta":
        train = splits.train
    else:
        train = (torch.cat([splits.train[0], splits.val[0]]), torch.cat([splits.train[1], splits.val[1]]))
    sched = None
    if variant == "multistep":
        milestones = sorted({max(1, int(round(f * cfg.epochs))) for f in cfg.milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    updater = None
    if variant == "meta":
        assert cfg.meta_lr is not None, "takes a resolved config (LRConfig.resolved)"
        updater = GimliUpdater(model, opt, cross_entropy, cross_entropy, unroll=cfg.unroll, learn={"lr": "group"},
                               meta_opt=functools.partial(torch.optim.Adam, lr=cfg.meta_lr), on_nonfinite="skip")

    rec: dict[str, Any] = {"epoch": [], "test_acc": [], "test_loss": [], "train_loss": [], "rates": [],
                           "val_loss": [], "hypergrad_lr": [], "meta_step_at": [], "seconds": 0.0,
                           "group_names": names, "steps": 0, "skipped_meta_steps": 0, "diverged_epoch": None}
    _, acc0 = evaluate(model, splits.test)
    rec["initial_test_acc"] = acc0
    rec["initial_rates"] = [float(g["lr"]) for g in opt.param_groups]
    first_epoch = 1
    saved = load(state_path) if (state_path is not None and cfg.resume) else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if sched is not None:
            sched.load_state_dict(saved["sched"])
        if updater is not None:
            updater.load_state_dict(saved["updater"])
        data_gen.set_state(saved["data_gen"])
        meta_gen.set_state(saved["meta_gen"])
        torch.set_rng_state(saved["torch_rng"])
        rec = saved["rec"]
        first_epoch = saved["epoch"] + 1
        if bar is not None:
            bar.update(saved["epoch"], f"{variant} seed {seed}: resumed after epoch {saved['epoch']}")
    start = time.perf_counter() - rec["seconds"]

    def meta_step() -> None:
        assert updater is not None
        # Under torchrun every rank trains identically; the meta step's batches are sharded
        # and GimliUpdater averages over the ranks (docs/DISTRIBUTED.md).
        rank, world = _ranks()
        meta_batches = sample_batches(splits.train, cfg.unroll, cfg.meta_batch_size, meta_gen)
        result = updater.step([_shard(b, rank, world) for b in meta_batches], _shard(splits.val, rank, world))
        rec["meta_step_at"].append(rec["steps"])  # the training steps taken before it
        if result.skipped:
            rec["skipped_meta_steps"] += 1
            return
        rec["val_loss"].append(float(result.val_loss))
        rec["hypergrad_lr"].append([float(v) for v in result.hypergrads["lr"]])  # type: ignore[union-attr]

    for epoch in range(first_epoch, cfg.epochs + 1):
        losses = []
        if rec["diverged_epoch"] is None:
            for b in minibatches(train, cfg.batch_size, data_gen):
                losses.append(_plain_step(model, opt, b))
                rec["steps"] += 1
                if not math.isfinite(losses[-1]):
                    break
                if updater is not None and cfg.meta_every is not None and rec["steps"] % cfg.meta_every == 0:
                    meta_step()
            if not all(math.isfinite(x) for x in losses) or not _finite_params(model):
                rec["diverged_epoch"] = epoch
            if sched is not None:
                sched.step()
            if updater is not None and cfg.meta_every is None and rec["diverged_epoch"] is None:
                meta_step()
        test_loss, test_acc = evaluate(model, splits.test)
        if rec["diverged_epoch"] is None and not math.isfinite(test_loss):  # e.g. running statistics overflowed
            rec["diverged_epoch"] = epoch
        diverged = rec["diverged_epoch"] is not None
        rec["epoch"].append(epoch)
        rec["test_acc"].append(test_acc)
        rec["test_loss"].append(None if diverged else test_loss)
        rec["train_loss"].append(None if diverged or not losses else sum(losses) / len(losses))
        rec["rates"].append([float(g["lr"]) for g in opt.param_groups])
        rec["seconds"] = time.perf_counter() - start
        if state_path is not None and _ranks()[0] == 0:  # one writer; every rank resumes from it
            save_atomic({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": None if sched is None else sched.state_dict(),
                         "updater": None if updater is None else updater.state_dict(),
                         "data_gen": data_gen.get_state(), "meta_gen": meta_gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "rec": rec}, state_path)
        if bar is not None:
            bar.update(1, f"{variant} seed {seed} epoch {epoch} test acc {test_acc:.3f}")
    rec["seconds"] = time.perf_counter() - start
    rec["final_test_acc"] = rec["test_acc"][-1]
    rec["best_test_acc"] = max(rec["test_acc"])
    return rec


def _ranks() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's equal share of a batch (a remainder of fewer than ``world`` rows is dropped:
    the ranks' mean losses average to the full-batch mean only over equal shards)."""
    if world == 1:
        return batch
    n = batch[1].shape[0] // world * world
    return tuple(t[:n].chunk(world)[rank] for t in batch)  # type: ignore[return-value]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Final and best test accuracy and final test loss of every variant, mean and std over seeds
    (the loss entries are None when every seed diverged; ``diverged`` counts the seeds that did)."""
    out = {}
    for variant, recs in runs.items():
        final = mean_std([r["final_test_acc"] for r in recs])
        best = mean_std([r["best_test_acc"] for r in recs])
        finite = [r["test_loss"][-1] for r in recs if r["test_loss"][-1] is not None]
        loss = mean_std(finite) if finite else (None, None)
        out[variant] = {"final_test_acc_mean": final[0], "final_test_acc_std": final[1],
                        "best_test_acc_mean": best[0], "best_test_acc_std": best[1],
                        "final_test_loss_mean": loss[0], "final_test_loss_std": loss[1],
                        "seconds_mean": mean_std([r["seconds"] for r in recs])[0],
                        "diverged": sum(r["diverged_epoch"] is not None for r in recs)}
    return out


def run_lr(cfg: LRConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Runs the three variants for every seed and writes ``lr.json``, ``lr_accuracy.png`` and
    ``lr_rates.png`` into ``cfg.out``.

    Returns:
        The content of ``lr.json``: the configuration, every per-epoch number of every run and
        the summary.
    """
    from .plots import plot_lr_accuracy, plot_lr_rates

    cfg = cfg.resolved()
    rank, world = _ranks()
    if cfg.meta_batch_size % world:
        raise ValueError(f"--meta-batch-size {cfg.meta_batch_size} must be divisible by the {world} ranks")
    if rank != 0:
        log = None  # rank 0 reports and writes the outputs
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    x, y = load_digits_tensors(cfg.device)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    start = time.perf_counter()
    if log:
        log(f"lr: {cfg.optimizer.upper()} from lr {cfg.lr:g}, {cfg.epochs} epochs, J={cfg.unroll}, "
            f"width {cfg.width}, seeds {cfg.seeds}, device {cfg.device}")
    with Progress(len(cfg.seeds) * len(VARIANTS) * cfg.epochs, "lr", enabled=cfg.progress) as bar:
        for seed in cfg.seeds:
            splits = split_digits(x, y, seed, cfg.val_frac, cfg.test_frac)
            for variant in VARIANTS:
                rec = train_variant(variant, cfg, splits, seed, bar, state_path=out / "state" / f"{variant}-{seed}.pt")
                rec["seed"] = seed
                runs[variant].append(rec)
    summary = summarize(runs)
    result = {
        "command": "lr",
        "config": {**asdict(cfg), "milestones": list(cfg.milestones)},
        "data": {"train": len(splits.train[1]), "val": len(splits.val[1]), "test": len(splits.test[1])},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - start,
        "summary": summary,
        "runs": runs,
    }
    check_finite(result)
    result["world_size"] = world
    if rank != 0:
        return result
    (out / "lr.json").write_text(json.dumps(result, indent=1))
    plot_lr_accuracy(runs, out / "lr_accuracy.png", title=f"digits, {cfg.optimizer.upper()} lr {cfg.lr:g}")
    plot_lr_rates(runs["meta"][0], out / "lr_rates.png")
    if log:
        log(f"{'variant':>10}  {'final test acc':>16}  {'best test acc':>16}")
        for variant, s in summary.items():
            log(f"{variant:>10}  {s['final_test_acc_mean']:.4f} ± {s['final_test_acc_std']:.4f}  "
                f"{s['best_test_acc_mean']:.4f} ± {s['best_test_acc_std']:.4f}")
        finals = ", ".join(f"{v} {100 * s['final_test_acc_mean']:.2f}%" for v, s in summary.items())
        log(f"lr: done in {result['seconds']:.1f} s; final test accuracy {finals} (mean of {len(cfg.seeds)} "
            f"seeds); wrote {out / 'lr.json'}, {out / 'lr_accuracy.png'}, {out / 'lr_rates.png'}")
    return result


SWEEP_VARIANTS = ("fixed", "meta")
DEFAULT_SWEEP = (0.01, 0.03, 0.1, 0.3, 1.0)


def run_lr_sweep(cfg: LRConfig, rates: list[float], log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """The fixed rate against meta-learned per-group rates from the same initial rate, for every
    rate in ``rates`` and every seed (``cfg.lr`` is ignored; ``cfg.meta_lr`` of ``None`` is each
    start's rate / 10, the default run's rule).

    Writes ``lr_sweep.json`` (every run), ``lr_sweep.md`` (the table), ``lr_sweep.png`` (final
    and best test accuracy against the initial rate) and ``lr_sweep_worst.png`` (test accuracy
    and the learned rates against epoch for the start where the fixed rate ends worst) into
    ``cfg.out``. Every run's state is saved after every epoch, so ``cfg.resume`` continues an
    interrupted sweep.

    Returns:
        The content of ``lr_sweep.json``.
    """
    from .plots import plot_lr_sweep, plot_lr_sweep_worst

    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"the sweep's rates must be positive and finite, got {rates}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    x, y = load_digits_tensors(cfg.device)
    start = time.perf_counter()
    every = "once per epoch" if cfg.meta_every is None else f"every {cfg.meta_every} training steps"
    if log:
        log(f"lr sweep: {cfg.optimizer.upper()} from lr {', '.join(f'{r:g}' for r in rates)}, fixed vs meta-learned "
            f"(meta step {every}, meta lr {'rate / 10' if cfg.meta_lr is None else f'{cfg.meta_lr:g}'}), "
            f"{cfg.epochs} epochs, J={cfg.unroll}, width {cfg.width}, seeds {cfg.seeds}, device {cfg.device}")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with Progress(len(rates) * len(cfg.seeds) * len(SWEEP_VARIANTS) * cfg.epochs, "lr sweep",
                  enabled=cfg.progress) as bar:
        for rate in rates:
            rcfg = LRConfig(**{**asdict(cfg), "lr": rate}).resolved()
            runs[f"{rate:g}"] = {v: [] for v in SWEEP_VARIANTS}
            for seed in cfg.seeds:
                splits = split_digits(x, y, seed, cfg.val_frac, cfg.test_frac)
                for variant in SWEEP_VARIANTS:
                    rec = train_variant(variant, rcfg, splits, seed, bar,
                                        state_path=out / "state" / f"sweep-{variant}-lr{rate:g}-{seed}.pt")
                    rec["seed"] = seed
                    runs[f"{rate:g}"][variant].append(rec)
    summary = {rate: summarize(by_variant) for rate, by_variant in runs.items()}
    worst = min(summary, key=lambda r: (summary[r]["fixed"]["final_test_acc_mean"], -float(r)))
    table = sweep_table(summary)
    result = {
        "command": "lr --sweep",
        "config": {**asdict(cfg), "milestones": list(cfg.milestones)},
        "rates": rates,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - start,
        "summary": summary,
        "worst_start": worst,
        "table_markdown": table,
        "runs": runs,
    }
    check_finite(result)
    (out / "lr_sweep.json").write_text(json.dumps(result, indent=1))
    (out / "lr_sweep.md").write_text(
        table + f"\nTest accuracy, mean ± std over seeds {cfg.seeds}; {cfg.epochs} epochs; meta step {every}. "
        f"The start where the fixed rate ends worst: {worst}.\n")
    title = f"digits, {cfg.optimizer.upper()}, {cfg.epochs} epochs, meta step {every}"
    plot_lr_sweep(runs, out / "lr_sweep.png", title=title)
    plot_lr_sweep_worst(runs[worst], out / "lr_sweep_worst.png", title=f"initial rate {worst}: {title}")
    if log:
        log(table.rstrip())
        f, m = summary[worst]["fixed"], summary[worst]["meta"]
        log(f"lr sweep: done in {result['seconds']:.1f} s; worst start {worst}: final test accuracy fixed "
            f"{100 * f['final_test_acc_mean']:.2f}%, meta-learned {100 * m['final_test_acc_mean']:.2f}%; wrote "
            f"{out / 'lr_sweep.json'}, {out / 'lr_sweep.md'}, {out / 'lr_sweep.png'}, {out / 'lr_sweep_worst.png'}")
    return result


def sweep_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The sweep as a Markdown table: one row per initial rate, final and best accuracy per variant."""
    lines = ["| initial rate | fixed: final | fixed: best | meta-learned: final | meta-learned: best "
             "| diverged (fixed / meta) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for rate, s in summary.items():
        cells = [f"{100 * s[v][k + '_mean']:.2f} ± {100 * s[v][k + '_std']:.2f}%"
                 for v in SWEEP_VARIANTS for k in ("final_test_acc", "best_test_acc")]
        lines.append(f"| {rate} | {' | '.join(cells)} | {s['fixed']['diverged']} / {s['meta']['diverged']} |")
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_SWEEP", "LRConfig", "SWEEP_VARIANTS", "VARIANTS", "evaluate", "run_lr", "run_lr_sweep",
           "summarize", "sweep_table", "train_variant"]
