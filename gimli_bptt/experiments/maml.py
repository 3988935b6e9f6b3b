# SPDX-License-Identifier: Apache-2.0
"""``gimli-bptt maml``: MAML with inner SGD vs inner Adam on few-shot digit tasks (paper Section 5.2, Table 1)."""
from __future__ import annotations

import copy
import functools
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..updater import GimliUpdater
from .data import Task, TaskSampler, load_digits_tensors, split_digits
from .models import cross_entropy, make_convnet, per_tensor_groups
from ..progress import Progress
from .report import check_finite, mean_std
from .runstate import load, save_atomic

OPTIMIZERS = ("sgd", "adam")
DEFAULT_INNER_LR = {"sgd": 0.1, "adam": 0.01}
LEARNED = {"sgd": ("lr",), "adam": ("lr", "beta1", "beta2")}


@dataclass
class MAMLConfig:
    """Settings of :func:`run_maml` (the flags of ``gimli-bptt maml``).

    Attributes:
        ways: N, classes per task.
        shots: The K values to run (support examples per class), one table column each.
        queries: Query examples per class (the validation loss of a task, and its test accuracy).
        unroll: J, inner steps on the support set, in meta-training and at test time.
        meta_steps: Meta updates per run.
        meta_batch: Tasks per meta update (hypergradients averaged over them).
        width: Channels of the conv net's first block (model size).
        optimizers: Inner optimizers to compare, from ``"sgd"`` and ``"adam"``.
        inner_lr: Initial inner learning rate of every group (``None``: 0.1 SGD, 0.01 Adam).
        meta_lr: Learning rate of the Adam meta optimizer (init weights and learned hyperparameters).
        holdout: ``"samples"`` (default): tasks of both phases draw from all ``train_classes +
            test_classes``, meta-test tasks from held-out examples (30% of every class).
            ``"classes"``: meta-training tasks from 70% of the examples of ``train_classes``,
            meta-test tasks from the disjoint ``test_classes`` (the standard few-shot protocol);
            with only 10 digit classes this over-specialises (see docs/EXPERIMENTS.md). The
            other 30% of the training classes' examples score "seen-class" tasks.
        train_classes, test_classes: Digit classes of meta-training and meta-test tasks.
        test_tasks: Meta-test tasks per run.
        seeds: Seeds to run; the table reports mean ± standard deviation over them.
        device: Torch device.
        threads: CPU threads of torch.
        out: Output folder.
        progress: Progress bars (``None``: on a terminal or in a Jupyter notebook, not in a log).
        learn_rates: Meta-learn the inner hyperparameters (per-group rates; Adam's betas too).
            ``False``: only θ_0 is learned, the inner optimizer keeps its initial values.
        resume: Continue from the states saved in ``out/state/`` (atomically, every
            ``save_every`` meta steps and at the end of every run).
        save_every: Meta steps between saved states.
        eval_every: Also score the meta-test tasks (and, with ``holdout="classes"``, seen-class
            tasks) before meta-training and after every ``eval_every`` meta steps (the
            accuracy-against-meta-steps curve in ``maml.json``); ``None``: only at the end.
    """

    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    queries: int = 10
    unroll: int = 5
    meta_steps: int = 100
    meta_batch: int = 2
    width: int = 8
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    inner_lr: Optional[float] = None
    meta_lr: float = 0.003
    holdout: str = "samples"
    train_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    test_classes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    test_tasks: int = 100
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/maml"
    progress: Optional[bool] = None
    learn_rates: bool = True
    eval_every: Optional[int] = None
    resume: bool = False
    save_every: int = 25


def protocol(cfg: MAMLConfig) -> str:
    """Which protocol is measured, in one sentence (printed by the command and into ``maml.md``)."""
    if cfg.holdout == "samples":
        classes = sorted(set(cfg.train_classes) | set(cfg.test_classes))
        return (f"Protocol: held-out EXAMPLES, not held-out classes: meta-training and meta-test tasks both draw "
                f"{cfg.ways}-way tasks from the digit classes {classes}; meta-test tasks use only the 30% of each "
                "class's examples that meta-training never sees.")
    return (f"Protocol: held-out CLASSES (the standard few-shot protocol): meta-training tasks are {cfg.ways}-way "
            f"tasks from the digit classes {cfg.train_classes} (70% of their examples), meta-test tasks "
            f"{cfg.ways}-way tasks from the unseen classes {cfg.test_classes}; 'seen classes' scores tasks from "
            f"the other 30% of the examples of {cfg.train_classes}.")


def _inner_opt(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown inner optimizer {name!r}: use one of {OPTIMIZERS}")


def apply_hypergradients(updater: GimliUpdater, hypergrads: dict[str, Tensor]) -> None:
    """One meta-optimizer step with summed/averaged hypergradients (a meta-batch of tasks).

    Sets ``.grad`` of every meta-parameter (in the order of ``named_meta_parameters()``),
    steps the meta optimizer, clamps the learned hyperparameters into range and writes them
    into the inner optimizer's ``param_groups`` (what :meth:`GimliUpdater.step` does for one task).
    """
    for name, t in updater.named_meta_parameters():
        t.grad = hypergrads[name].detach().to(t.dtype).clone()
    updater.meta_opt.step()
    updater.hyper.project()
    updater.hyper.write_back(updater.opt.param_groups)


def adapt_and_score(model: nn.Module, opt: torch.optim.Optimizer, task: Task, steps: int) -> float:
    """Query accuracy after ``steps`` plain ``torch.optim`` steps on the support set.

    Works on a copy of the model (θ_0) and a fresh optimizer with the learned group values, so
    nothing is changed. BatchNorm stays in training mode (batch statistics), as in MAML.
    """
    fast = copy.deepcopy(model).train()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [q]}
              for g, q in zip(opt.param_groups, fast.parameters())]
    # the concrete optimizer classes (SGD, Adam) default every option but the parameters
    make: Callable[..., torch.optim.Optimizer] = type(opt)
    inner = make(groups)
    for _ in range(steps):
        inner.zero_grad(set_to_none=True)
        cross_entropy(fast, task.support).backward()
        inner.step()
    with torch.no_grad():
        x, y = task.query
        return float((fast(x).argmax(1) == y).float().mean())


def train_maml(cfg: MAMLConfig, data: tuple[Tensor, Tensor], optimizer: str, shots: int, seed: int,
               bar: Optional[Progress] = None, state_path: Optional[Path] = None) -> dict[str, Any]:
    """Meta-trains θ_0 and the per-group inner hyperparameters for one setting and seed, then
    scores ``cfg.test_tasks`` tasks from the held-out classes.

    Every task starts from a fresh inner optimizer state (the optimizer's ``state`` stays empty:
    the unroll never writes it). Each meta step averages the exact hypergradients of
    ``cfg.meta_batch`` tasks (:meth:`GimliUpdater.hypergradient`, J = ``cfg.unroll`` steps on
    the support set, cross-entropy on the query set) and applies them with one Adam step.

    With ``state_path``, the run's state (θ_0, the updater and its meta optimizer, the task
    samplers' generators, the record so far) is saved there atomically every ``cfg.save_every``
    meta steps and at the end; with ``cfg.resume`` the run continues from it, bit-identically to
    an uninterrupted run, and a finished run is not run again.
    """
    x, y = data
    torch.manual_seed(seed)
    model = make_convnet(cfg.width, num_classes=cfg.ways).to(cfg.device)
    groups, names = per_tensor_groups(model)
    lr = DEFAULT_INNER_LR[optimizer] if cfg.inner_lr is None else cfg.inner_lr
    opt = _inner_opt(optimizer, groups, lr)
    learned = LEARNED[optimizer] if cfg.learn_rates else ()
    updater = GimliUpdater(model, opt, cross_entropy, cross_entropy, unroll=cfg.unroll,
                           learn={k: "group" for k in learned} or None, learn_init=True,
                           meta_opt=functools.partial(torch.optim.Adam, lr=cfg.meta_lr))
    if cfg.holdout == "samples":
        classes = sorted(set(cfg.train_classes) | set(cfg.test_classes))
        splits = split_digits(x, y, seed, val_frac=0.0, test_frac=0.3)
        train_tasks = TaskSampler(*splits.train, classes, cfg.ways, shots, cfg.queries, seed=seed + 1)
        test_tasks = TaskSampler(*splits.test, classes, cfg.ways, shots, cfg.queries, seed=seed + 2)
        seen_tasks = None
    else:
        splits = split_digits(x, y, seed, val_frac=0.0, test_frac=0.3)
        train_tasks = TaskSampler(*splits.train, cfg.train_classes, cfg.ways, shots, cfg.queries, seed=seed + 1)
        test_tasks = TaskSampler(x, y, cfg.test_classes, cfg.ways, shots, cfg.queries, seed=seed + 2)
        seen_tasks = TaskSampler(*splits.test, cfg.train_classes, cfg.ways, shots, cfg.queries, seed=seed + 3)

    def score(sampler: TaskSampler, fixed_seed: int) -> float:
        """Mean query accuracy on ``cfg.test_tasks`` tasks; every call draws the same tasks and
        leaves the sampler's own generator where it was."""
        saved = sampler.gen.get_state()
        sampler.gen.manual_seed(fixed_seed)
        accs = [adapt_and_score(model, opt, sampler.sample(), cfg.unroll) for _ in range(cfg.test_tasks)]
        sampler.gen.set_state(saved)
        return sum(accs) / len(accs)

    def group_values() -> dict[str, list[float]]:
        return {k: [float(updater.opt.param_groups[g]["lr"] if k == "lr" else
                          updater.opt.param_groups[g]["betas"][0 if k == "beta1" else 1])
                    for g in range(len(names))] for k in learned}

    rec: dict[str, Any] = {"optimizer": optimizer, "shots": shots, "seed": seed, "group_names": names,
                           "query_loss": [], "skipped_tasks": 0, "values": {k: [v] for k, v in group_values().items()},
                           "curve": {"meta_step": [], "test_acc": [], "seen_acc": []}}

    def record_curve(step: int) -> None:
        rec["curve"]["meta_step"].append(step)
        rec["curve"]["test_acc"].append(score(test_tasks, seed + 20))
        if seen_tasks is not None:
            rec["curve"]["seen_acc"].append(score(seen_tasks, seed + 30))

    samplers = [t for t in (train_tasks, test_tasks, seen_tasks) if t is not None]

    def save(step: int, done: bool = False) -> None:
        if state_path is not None:
            save_atomic({"meta_step": step, "done": done, "model": model.state_dict(), "updater": updater.state_dict(),
                         "gens": [t.gen.get_state() for t in samplers], "torch_rng": torch.get_rng_state(),
                         "rec": rec}, state_path)

    first = 0
    saved = load(state_path, progress_key="meta_step") if (state_path is not None and cfg.resume) else None
    if saved is not None:
        if saved["done"]:
            if bar is not None:
                bar.update(cfg.meta_steps, f"{optimizer} {shots}-shot seed {seed}: finished before")
            return saved["rec"]
        model.load_state_dict(saved["model"])
        updater.load_state_dict(saved["updater"])
        for t, state in zip(samplers, saved["gens"]):
            t.gen.set_state(state)
        torch.set_rng_state(saved["torch_rng"])
        rec, first = saved["rec"], int(saved["meta_step"])
        if bar is not None:
            bar.update(first, f"{optimizer} {shots}-shot seed {seed}: resumed at meta step {first}")
    start = time.perf_counter() - rec.get("train_seconds", 0.0)
    if cfg.eval_every is not None and first == 0:
        record_curve(0)
    for step in range(first, cfg.meta_steps):
        total: dict[str, Tensor] = {}
        losses = []
        for _ in range(cfg.meta_batch):
            task = train_tasks.sample()
            result = updater.hypergradient([task.support] * cfg.unroll, task.query)
            if result.nonfinite:
                rec["skipped_tasks"] += 1
                continue
            losses.append(float(result.val_loss))
            for name, g in result.hypergrads.items():
                assert isinstance(g, Tensor), name  # per-group rates and θ_0: one tensor each, no element-wise list
                share = g / cfg.meta_batch
                total[name] = total[name] + share if name in total else share
        if losses:
            apply_hypergradients(updater, total)
            rec["query_loss"].append(sum(losses) / len(losses))
        for k, v in group_values().items():
            rec["values"][k].append(v)
        if cfg.eval_every is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.meta_steps):
            record_curve(step + 1)
        if bar is not None:
            bar.update(1, f"{optimizer} {cfg.ways}-way {shots}-shot seed {seed} "
                          f"query loss {rec['query_loss'][-1] if rec['query_loss'] else float('nan'):.3f}")
        rec["train_seconds"] = time.perf_counter() - start
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.meta_steps:
            save(step + 1)
    rec["train_seconds"] = time.perf_counter() - start
    accs = [adapt_and_score(model, opt, test_tasks.sample(), cfg.unroll) for _ in range(cfg.test_tasks)]
    rec["test_acc"] = sum(accs) / len(accs)
    rec["test_acc_task_std"] = mean_std(accs)[1]
    if seen_tasks is not None:
        rec["seen_acc"] = score(seen_tasks, seed + 30)
    save(cfg.meta_steps, done=True)
    return rec


def markdown_table(cfg: MAMLConfig, summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """The results as a Markdown table: one row per inner optimizer, one column per K."""
    cols = [f"{cfg.ways}-way {k}-shot" for k in cfg.shots]
    lines = [f"| inner optimizer (learned) | {' | '.join(cols)} |", "| --- |" + " --- |" * len(cols)]
    for opt_name in cfg.optimizers:
        cells = []
        for k in cfg.shots:
            s = summary[opt_name][str(k)]
            cells.append(f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}%")
        label = ({"sgd": "SGD (per-group lr)", "adam": "Adam (per-group lr, β1, β2)"}[opt_name] if cfg.learn_rates
                 else {"sgd": "SGD (fixed rates)", "adam": "Adam (fixed lr and betas)"}[opt_name])
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def run_maml(cfg: MAMLConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Runs every (inner optimizer, K, seed) and writes ``maml.json``, ``maml.md`` and one
    ``maml_rates_<optimizer>.png`` per optimizer (learned values of the first K and seed) into
    ``cfg.out``.

    Returns:
        The content of ``maml.json``.
    """
    from .plots import plot_panels

    for name in cfg.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {name!r}: use one of {OPTIMIZERS}")
    if cfg.holdout not in ("samples", "classes"):
        raise ValueError(f"holdout must be 'samples' or 'classes', got {cfg.holdout!r}")
    if cfg.holdout == "classes" and set(cfg.train_classes) & set(cfg.test_classes):
        raise ValueError("with holdout='classes', train_classes and test_classes must be disjoint")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    data = load_digits_tensors(cfg.device)
    start = time.perf_counter()
    if log:
        log(protocol(cfg))
        log(f"maml: {cfg.ways}-way {cfg.shots}-shot digits, held-out {cfg.holdout}, train classes "
            f"{cfg.train_classes}, test classes {cfg.test_classes}; inner {cfg.optimizers}, J={cfg.unroll}, {cfg.meta_steps} meta steps x "
            f"{cfg.meta_batch} tasks, seeds {cfg.seeds}, device {cfg.device}")
    runs: list[dict[str, Any]] = []
    total = len(cfg.optimizers) * len(cfg.shots) * len(cfg.seeds) * cfg.meta_steps
    with Progress(total, "maml", enabled=cfg.progress) as bar:
        for opt_name in cfg.optimizers:
            for k in cfg.shots:
                for seed in cfg.seeds:
                    runs.append(train_maml(cfg, data, opt_name, k, seed, bar,
                                           out / "state" / f"{opt_name}-{k}shot-{seed}.pt"))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for opt_name in cfg.optimizers:
        summary[opt_name] = {}
        for k in cfg.shots:
            accs = [r["test_acc"] for r in runs if r["optimizer"] == opt_name and r["shots"] == k]
            m, s = mean_std(accs)
            summary[opt_name][str(k)] = {"test_acc_mean": m, "test_acc_std": s, "seeds": len(accs)}
            seen_accs = [r["seen_acc"] for r in runs if r["optimizer"] == opt_name and r["shots"] == k and "seen_acc" in r]
            if seen_accs:
                summary[opt_name][str(k)]["seen_acc_mean"], summary[opt_name][str(k)]["seen_acc_std"] = mean_std(seen_accs)
    table = markdown_table(cfg, summary)
    result = {
        "command": "maml",
        "config": asdict(cfg),
        "protocol": protocol(cfg),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - start,
        "summary": summary,
        "table_markdown": table,
        "runs": runs,
    }
    check_finite(result)
    (out / "maml.json").write_text(json.dumps(result, indent=1))
    where = (f"held-out examples (30% of each class) of classes {sorted(set(cfg.train_classes) | set(cfg.test_classes))}"
             if cfg.holdout == "samples" else f"the held-out classes {cfg.test_classes}")
    note = (f"Test accuracy on {cfg.test_tasks} tasks per seed from {where} "
            f"after J={cfg.unroll} inner steps; mean ± standard deviation over seeds {cfg.seeds}.\n")
    seen = ""
    if cfg.holdout == "classes":
        seen_cells = [f"{o} {k}-shot {100 * summary[o][str(k)]['seen_acc_mean']:.2f} ± "
                      f"{100 * summary[o][str(k)]['seen_acc_std']:.2f}%" for o in cfg.optimizers for k in cfg.shots]
        seen = "\nOn tasks from held-out examples of the training classes (seen classes): " + "; ".join(seen_cells) + ".\n"
    (out / "maml.md").write_text(table + "\n" + note + seen + "\n" + protocol(cfg) + "\n")
    for opt_name in cfg.optimizers if cfg.learn_rates else ():
        first = next(r for r in runs if r["optimizer"] == opt_name)
        plot_panels(list(range(cfg.meta_steps + 1)), first["values"], first["group_names"],
                    out / f"maml_rates_{opt_name}.png", xlabel="meta step",
                    title=f"MAML, inner {opt_name.upper()}: learned per-group values "
                          f"({cfg.ways}-way {first['shots']}-shot, seed {first['seed']})")
    if log:
        log(table.rstrip())
        cells = ", ".join(f"{o} {k}-shot {100 * summary[o][str(k)]['test_acc_mean']:.1f}%"
                          for o in cfg.optimizers for k in cfg.shots)
        log(f"maml: done in {result['seconds']:.1f} s; held-out {cfg.holdout}: test accuracy {cells}; wrote "
            f"{out / 'maml.json'}, {out / 'maml.md'}"
            + "".join(f", {out / f'maml_rates_{o}.png'}" for o in (cfg.optimizers if cfg.learn_rates else ())))
    return result


__all__ = ["MAMLConfig", "OPTIMIZERS", "adapt_and_score", "apply_hypergradients", "markdown_table", "run_maml",
           "train_maml"]
