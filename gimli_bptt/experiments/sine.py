# SPDX-License-Identifier: Apache-2.0
"""``gimli-bptt sine``: K-shot sinusoid regression (MAML, Finn et al. 2017; Meta-SGD, Li et al. 2017).

Every method meta-trains through :class:`~gimli_bptt.GimliUpdater` with ``tasks=T`` (a whole
meta-batch of tasks in one sweep) and is scored on the same fixed test tasks, with a 95%
confidence interval over tasks, beside the numbers the papers publish.
"""
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
from .report import check_finite
from .runstate import load, save_atomic

METHODS = ("maml", "metasgd", "maml-adam", "fomaml")
LABELS = {"maml": "MAML", "metasgd": "Meta-SGD", "maml-adam": "MAML, inner Adam", "fomaml": "FOMAML"}
LEARNED = {"maml": "θ_0; inner SGD at a fixed rate", "metasgd": "θ_0 and a rate per element (inner SGD)",
           "maml-adam": "θ_0; inner Adam with a learned lr, β1, β2 per tensor",
           "fomaml": "θ_0 (first-order hypergradient); inner SGD at a fixed rate"}

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT = (-5.0, 5.0)
HIDDEN = 40
TEST_SEED = 20170309  # the fixed test tasks: the same for every method, seed and run
METASGD_INIT = (0.005, 0.1)  # Meta-SGD draws its initial per-element rates uniformly from this range

# Published K-shot MSE ± 95% CI after one inner step at test time: Li et al. (2017), Table 1
# (quoted; check against the paper before citing). The MAML paper itself reports the sinusoid
# only as a figure (its Figure 2).
PUBLISHED: dict[tuple[str, int], tuple[float, float]] = {
    ("maml", 5): (1.13, 0.18), ("maml", 10): (0.85, 0.14), ("maml", 20): (0.71, 0.12),
    ("metasgd", 5): (0.90, 0.16), ("metasgd", 10): (0.53, 0.09), ("metasgd", 20): (0.31, 0.05),
}
PUBLISHED_SOURCE = "Li et al. 2017 (Meta-SGD, arXiv:1707.09835), Table 1"


@dataclass
class SineConfig:
    """Settings of :func:`run_sine` (the flags of ``gimli-bptt sine``).

    Attributes:
        shots: The K values: K support and K query points per task, one table column each.
        iterations: Meta updates per run (the MAML code's sinusoid command runs 70,000).
        methods: From ``"maml"``, ``"metasgd"``, ``"maml-adam"`` and ``"fomaml"``.
        meta_batch: T, tasks per meta update (25 in both papers).
        unroll: J, inner steps in meta-training (1 in both papers).
        inner_lr: The inner rate: fixed for MAML and FOMAML, the initial rate of inner Adam.
            0.01 is the MAML paper's α; the MAML code's default (``update_lr``) is 0.001.
        meta_lr: Learning rate of the Adam meta optimizer (0.001, the MAML code's default).
        test_tasks: The fixed test tasks (600, as the MAML code evaluates).
        test_steps: Inner steps at test time for the MSE-against-steps curve (the table is at J).
        seeds: Seeds to run (each seeds θ_0, the training tasks and Meta-SGD's initial rates).
        device: Torch device.
        threads: CPU threads of torch.
        out: Output folder.
        progress: Progress bars (``None``: on a terminal or in a Jupyter notebook, not in a log).
        resume: Continue from the states saved in ``out/state/`` (atomically, every
            ``save_every`` iterations and at the end of every run).
        save_every: Iterations between saved states.
        log_every: Iterations averaged into one point of the recorded meta-training loss.
        compile: ``GimliUpdater(compile=True)``: each inner and reverse step as one compiled graph
            (the first meta step of each run compiles them).
    """

    shots: list[int] = field(default_factory=lambda: [5, 10, 20])
    iterations: int = 1500
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    meta_batch: int = 25
    unroll: int = 1
    inner_lr: float = 0.01
    meta_lr: float = 0.001
    test_tasks: int = 600
    test_steps: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/sine"
    progress: Optional[bool] = None
    resume: bool = False
    save_every: int = 500
    log_every: int = 50
    compile: bool = False


def make_mlp() -> nn.Sequential:
    """The regressor of both papers: 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


def mse(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training and validation loss: mean squared error of ``model(x)`` against ``y``."""
    x, y = batch
    return F.mse_loss(model(x), y)


@dataclass
class SineTasks:
    """T sinusoid tasks, stacked: ``support`` and ``query`` are ``(x, y)`` of shape ``(T, K, 1)``."""

    amplitude: Tensor
    phase: Tensor
    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]


def sample_tasks(n: int, shots: int, gen: torch.Generator, device: str | torch.device = "cpu") -> SineTasks:
    """``n`` tasks y = A sin(x - φ), A ~ U[0.1, 5], φ ~ U[0, π], with ``shots`` support and
    ``shots`` query points x ~ U[-5, 5] each (drawn from ``gen``, on the CPU, then moved)."""
    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    amp, phase = u(*AMPLITUDE, n, 1, 1), u(*PHASE, n, 1, 1)
    x = u(*INPUT, n, 2 * shots, 1)
    y = amp * torch.sin(x - phase)
    x, y, amp, phase = (t.to(device) for t in (x, y, amp, phase))
    return SineTasks(amp, phase, (x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:]))


def fixed_test_tasks(cfg: SineConfig, shots: int) -> SineTasks:
    """The fixed test tasks of a K: the same for every method and seed."""
    return sample_tasks(cfg.test_tasks, shots, torch.Generator().manual_seed(TEST_SEED + shots), cfg.device)


def build(method: str, cfg: SineConfig, seed: int) -> tuple[nn.Module, GimliUpdater]:
    """θ_0 (seeded), the inner optimizer and the updater of one method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    torch.manual_seed(seed)
    model = make_mlp().to(cfg.device)
    learn: Optional[dict[str, str]] = None
    if method == "maml-adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.inner_lr)
        learn = {"lr": "tensor", "beta1": "tensor", "beta2": "tensor"}
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr)
        if method == "metasgd":
            learn = {"lr": "element"}
    updater = GimliUpdater(model, opt, mse, mse, unroll=cfg.unroll, learn=learn, learn_init=True,
                           tasks=cfg.meta_batch, first_order=method == "fomaml", progress=False, compile=cfg.compile,
                           meta_opt=functools.partial(torch.optim.Adam, lr=cfg.meta_lr))
    if method == "metasgd":
        gen = torch.Generator().manual_seed(seed + 3)
        with torch.no_grad():
            for t in updater.hyper.values["lr"]:  # type: ignore[union-attr]
                t.copy_(METASGD_INIT[0] + (METASGD_INIT[1] - METASGD_INIT[0]) * torch.rand(t.shape, generator=gen))
    return model, updater


def adapt(updater: GimliUpdater, support: tuple[Tensor, Tensor], steps: int) -> list[dict[str, Tensor]]:
    """The parameters of every task after 0, 1, ..., ``steps`` inner steps on its support set.

    Runs the inner optimizer of ``updater`` with its current learned values (SGD at a fixed or a
    per-element rate; Adam with per-tensor lr and betas, exactly as ``torch.optim.Adam`` steps),
    vectorised over the tasks with ``torch.func``; nothing is changed.

    Returns:
        ``steps + 1`` dicts ``{parameter name: tensor of shape (T, *parameter shape)}``.
    """
    from torch.func import functional_call, grad, vmap

    model = updater.model
    names = [n for n, _ in model.named_parameters()]
    hyper = updater.hyper.per_param()
    n_tasks = support[0].shape[0]

    def task_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(model, params, (x,)), y)

    grads = vmap(grad(task_loss))
    params = {n: p.detach().unsqueeze(0).expand(n_tasks, *p.shape).clone() for n, p in model.named_parameters()}
    adam = isinstance(updater.opt, torch.optim.Adam)
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    out = [params]
    with torch.no_grad():
        for t in range(1, steps + 1):
            G = grads(params, *support)
            new = {}
            for n, h in zip(names, hyper):
                lr = h["lr"]
                if not adam:
                    new[n] = params[n] - lr * G[n]
                    continue
                b1, b2 = h["beta1"], h["beta2"]
                m[n] = b1 * m[n] + (1 - b1) * G[n]
                v[n] = b2 * v[n] + (1 - b2) * G[n] * G[n]
                bias1 = 1 - b1 ** t
                bias2 = 1 - b2 ** t
                bias2_sqrt = bias2 ** 0.5 if isinstance(bias2, float) else bias2.sqrt()
                denom = v[n].sqrt() / bias2_sqrt + h["eps"]
                new[n] = params[n] - (lr / bias1) * m[n] / denom
            params = new
            out.append(params)
    return out


def predict(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``model`` with each task's parameters on each task's inputs ``x`` of shape ``(T, N, 1)``."""
    from torch.func import functional_call, vmap

    with torch.no_grad():
        return vmap(lambda p, xi: functional_call(model, p, (xi,)))(params, x)


def task_mse(model: nn.Module, params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    """The MSE of every task on ``batch``, shape ``(T,)``."""
    x, y = batch
    return ((predict(model, params, x) - y) ** 2).mean(dim=(1, 2))


def evaluate(updater: GimliUpdater, tasks: SineTasks, steps: int) -> dict[str, list[Optional[float]]]:
    """Query MSE after 0..``steps`` inner steps: mean over the tasks and its 95% confidence
    interval (1.96 standard deviations over the square root of the number of tasks, as the MAML
    code computes it). Rates learned for J steps can diverge when stepped further: a mean that
    is no longer finite is ``None`` (JSON null), and so is its interval."""
    curve = [task_mse(updater.model, p, tasks.query) for p in adapt(updater, tasks.support, steps)]
    n = tasks.query[0].shape[0]
    return sanitize_curve({"mse": [float(c.mean()) for c in curve],
                           "ci95": [float(1.96 * c.std(unbiased=False) / math.sqrt(n)) for c in curve]})


def sanitize_curve(curve: dict[str, list[Optional[float]]]) -> dict[str, list[Optional[float]]]:
    """``curve`` with every non-finite mean, and its interval, replaced by ``None``."""
    ok = [m is not None and c is not None and math.isfinite(m) and math.isfinite(c)
          for m, c in zip(curve["mse"], curve["ci95"])]
    return {"mse": [m if good else None for m, good in zip(curve["mse"], ok)],
            "ci95": [c if good else None for c, good in zip(curve["ci95"], ok)]}


def learned_values(updater: GimliUpdater) -> dict[str, Any]:
    """The learned inner hyperparameters, summarised per parameter tensor (mean, min, max)."""
    names = [n for n, _ in updater.model.named_parameters()]
    out: dict[str, Any] = {}
    for key, value in updater.hyper.values.items():
        if isinstance(value, list):
            out[key] = {n: {"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max())}
                        for n, t in zip(names, (v.detach() for v in value))}
        else:
            out[key] = dict(zip(names, (float(x) for x in value.detach().reshape(-1))))
    return out


def train_sine(cfg: SineConfig, method: str, shots: int, seed: int, bar: Optional[Progress] = None,
               state_path: Optional[Path] = None) -> dict[str, Any]:
    """Meta-trains one method for one K and seed, then scores it on the fixed test tasks.

    Each iteration draws ``cfg.meta_batch`` fresh tasks and makes one meta step
    (:meth:`GimliUpdater.step`: J inner steps on every task's support set, the mean query MSE
    at θ'_J, one Adam step on θ_0 and the learned hyperparameters).

    With ``state_path``, the run's state (θ_0, the updater and its meta optimizer, the task
    generator, the record so far) is saved there atomically every ``cfg.save_every``
    iterations and at the end; with ``cfg.resume`` the run continues from it, bit-identically
    to an uninterrupted run, and a finished run is not run again.
    """
    model, updater = build(method, cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rec: dict[str, Any] = {"method": method, "shots": shots, "seed": seed, "query_loss": [], "seconds": 0.0}
    first = 0
    block: list[float] = []
    saved = load(state_path, progress_key="iteration") if (state_path is not None and cfg.resume) else None
    if saved is not None:
        if saved.get("done"):
            if bar is not None:
                bar.update(cfg.iterations, f"{method} {shots}-shot seed {seed}: finished before")
            rec = saved["rec"]
            rec["test"] = sanitize_curve(rec["test"])
            return rec
        model.load_state_dict(saved["model"])
        updater.load_state_dict(saved["updater"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        rec, block, first = saved["rec"], list(saved["block"]), int(saved["iteration"])
        if bar is not None:
            bar.update(first, f"{method} {shots}-shot seed {seed}: resumed at iteration {first}")

    def save(iteration: int, done: bool = False) -> None:
        if state_path is not None:
            save_atomic({"iteration": iteration, "done": done, "model": model.state_dict(),
                         "updater": updater.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                         "rec": rec, "block": block}, state_path)

    start = time.perf_counter() - rec["seconds"]
    for it in range(first, cfg.iterations):
        tasks = sample_tasks(cfg.meta_batch, shots, gen, cfg.device)
        result = updater.step([tasks.support] * cfg.unroll, tasks.query)
        block.append(float(result.val_loss))
        if len(block) == cfg.log_every or it + 1 == cfg.iterations:
            rec["query_loss"].append(sum(block) / len(block))
            block = []
        if bar is not None:
            bar.update(1, f"{method} {shots}-shot seed {seed} query MSE {float(result.val_loss):.3f}")
        rec["seconds"] = time.perf_counter() - start
        if (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
            save(it + 1)
    rec["train_seconds"] = time.perf_counter() - start
    test = fixed_test_tasks(cfg, shots)
    rec["test"] = evaluate(updater, test, max(cfg.test_steps, cfg.unroll))
    rec["test_mse"] = rec["test"]["mse"][cfg.unroll]
    rec["test_ci95"] = rec["test"]["ci95"][cfg.unroll]
    if rec["test_mse"] is None:
        raise FloatingPointError(f"{method} {shots}-shot seed {seed}: the test MSE after J={cfg.unroll} steps is "
                                 "not finite; lower --meta-lr or --inner-lr")
    rec["learned"] = learned_values(updater)
    rec["examples"] = example_predictions(updater, test, cfg.unroll)
    rec["seconds"] = time.perf_counter() - start
    save(cfg.iterations, done=True)
    return rec


def example_predictions(updater: GimliUpdater, tasks: SineTasks, steps: int, n: int = 3,
                        points: int = 100) -> dict[str, Any]:
    """The first ``n`` test tasks on a grid of ``points`` inputs: the true curve, the support
    points, and the prediction before and after ``steps`` inner steps (for the tasks figure)."""
    sub = SineTasks(tasks.amplitude[:n], tasks.phase[:n], tuple(t[:n] for t in tasks.support),  # type: ignore[arg-type]
                    tuple(t[:n] for t in tasks.query))  # type: ignore[arg-type]
    grid = torch.linspace(*INPUT, points, device=tasks.amplitude.device).reshape(1, points, 1).expand(n, points, 1)
    path = adapt(updater, sub.support, steps)
    return {"x": grid[0, :, 0].tolist(), "true": (sub.amplitude * torch.sin(grid - sub.phase))[..., 0].tolist(),
            "support_x": sub.support[0][..., 0].tolist(), "support_y": sub.support[1][..., 0].tolist(),
            "before": predict(updater.model, path[0], grid)[..., 0].tolist(),
            "after": predict(updater.model, path[-1], grid)[..., 0].tolist(), "steps": steps}


def summarize(cfg: SineConfig, runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and K: the test MSE after J steps (mean over seeds of the per-seed means, and
    the mean of the per-seed 95% CIs), beside the published number where there is one."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in cfg.methods:
        out[method] = {}
        for k in cfg.shots:
            recs = [r for r in runs if r["method"] == method and r["shots"] == k]
            pub = PUBLISHED.get((method, k)) if cfg.unroll == 1 else None
            out[method][str(k)] = {
                "test_mse": sum(r["test_mse"] for r in recs) / len(recs),
                "test_ci95": sum(r["test_ci95"] for r in recs) / len(recs),
                "per_seed": [r["test_mse"] for r in recs],
                "published_mse": None if pub is None else pub[0],
                "published_ci95": None if pub is None else pub[1],
            }
    return out


def markdown_table(cfg: SineConfig, summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The table of ``sine.md``: our MSE ± 95% CI and the published one, per method and K."""
    cols = [f"{k}-shot: ours | {k}-shot: published" for k in cfg.shots]
    lines = [f"| method (meta-learned) | {' | '.join(cols)} |", "| --- |" + " --- | --- |" * len(cfg.shots)]
    for method in cfg.methods:
        cells = []
        for k in cfg.shots:
            s = summary[method][str(k)]
            cells.append(f"{s['test_mse']:.3f} ± {s['test_ci95']:.3f}")
            pub = "—" if s["published_mse"] is None else f"{s['published_mse']:.2f} ± {s['published_ci95']:.2f}"
            cells.append(pub)
        lines.append(f"| {LABELS[method]} ({LEARNED[method]}) | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def run_sine(cfg: SineConfig, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Runs every (method, K, seed) and writes ``sine.json``, ``sine.md``, ``sine_steps.png``
    (test MSE against inner steps) and ``sine_tasks.png`` (a few adapted test tasks) into ``cfg.out``.

    Returns:
        The content of ``sine.json``.
    """
    from .plots import plot_sine_steps, plot_sine_tasks

    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}: use {', '.join(METHODS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    if log:
        log(f"sine: {cfg.shots}-shot sinusoid regression, methods {cfg.methods}, {cfg.iterations} iterations x "
            f"{cfg.meta_batch} tasks, J={cfg.unroll}, inner lr {cfg.inner_lr:g}, meta lr {cfg.meta_lr:g}, "
            f"{cfg.test_tasks} test tasks, seeds {cfg.seeds}, device {cfg.device}"
            + (", compiled meta-steps" if cfg.compile else ""))
    runs: list[dict[str, Any]] = []
    total = len(cfg.methods) * len(cfg.shots) * len(cfg.seeds) * cfg.iterations
    with Progress(total, "sine", enabled=cfg.progress) as bar:
        for k in cfg.shots:
            for method in cfg.methods:
                for seed in cfg.seeds:
                    runs.append(train_sine(cfg, method, k, seed, bar, out / "state" / f"{method}-{k}shot-{seed}.pt"))
    summary = summarize(cfg, runs)
    table = markdown_table(cfg, summary)
    result = {
        "command": "sine",
        "config": asdict(cfg),
        "protocol": protocol(cfg),
        "published_source": PUBLISHED_SOURCE,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - start,
        "run_seconds": sum(r["seconds"] for r in runs),
        "summary": summary,
        "table_markdown": table,
        "runs": runs,
    }
    check_finite(result)
    (out / "sine.json").write_text(json.dumps(result, indent=1))
    note = (f"Test MSE on {cfg.test_tasks} fixed tasks after J={cfg.unroll} inner step(s) (K support points to adapt "
            f"on, K query points to score), ± the 95% confidence interval over tasks; mean over seeds {cfg.seeds}. "
            f"{cfg.iterations} meta iterations of {cfg.meta_batch} tasks per run. Published: {PUBLISHED_SOURCE} "
            f"(1 inner step, 95% CI); '—': no published number for this setting.\n\n{protocol(cfg)}\n")
    (out / "sine.md").write_text(table + "\n" + note)
    plot_sine_steps(cfg.shots, cfg.methods, runs, out / "sine_steps.png", LABELS)
    plot_sine_tasks(runs, out / "sine_tasks.png", LABELS, shots=cfg.shots[len(cfg.shots) // 2], seed=cfg.seeds[0])
    if log:
        log(table.rstrip())
        k_mid = str(cfg.shots[len(cfg.shots) // 2])
        parts = []
        for method in cfg.methods:
            s = summary[method][k_mid]
            pub = "" if s["published_mse"] is None else f" (published {s['published_mse']:.2f})"
            parts.append(f"{method} {s['test_mse']:.3f} ± {s['test_ci95']:.3f}{pub}")
        log(f"sine: {len(runs)} runs, {result['run_seconds']:.0f} s of run time ({result['seconds']:.0f} s in this "
            f"process); {k_mid}-shot test MSE: {'; '.join(parts)}; "
            f"wrote {out / 'sine.json'}, {out / 'sine.md'}, {out / 'sine_steps.png'}, {out / 'sine_tasks.png'}")
    return result


def protocol(cfg: SineConfig) -> str:
    """The protocol in one paragraph (printed into ``sine.md``)."""
    return (f"Protocol: tasks y = A sin(x - φ), A ~ U[{AMPLITUDE[0]:g}, {AMPLITUDE[1]:g}], φ ~ U[0, π], "
            f"x ~ U[{INPUT[0]:g}, {INPUT[1]:g}]; MLP 1-{HIDDEN}-{HIDDEN}-1 with ReLU, MSE; {cfg.meta_batch} tasks per "
            f"meta step (GimliUpdater(..., tasks={cfg.meta_batch})), J={cfg.unroll} inner step(s), Adam meta optimizer "
            f"(lr {cfg.meta_lr:g}); inner rate {cfg.inner_lr:g} (fixed for MAML and FOMAML, the initial rate of "
            f"inner Adam; Meta-SGD's per-element rates start from U[{METASGD_INIT[0]:g}, {METASGD_INIT[1]:g}]).")


__all__ = ["LABELS", "METHODS", "PUBLISHED", "PUBLISHED_SOURCE", "SineConfig", "SineTasks", "adapt", "build",
           "evaluate", "fixed_test_tasks", "make_mlp", "markdown_table", "mse", "predict", "run_sine", "sample_tasks",
           "sanitize_curve", "summarize", "task_mse", "train_sine"]
