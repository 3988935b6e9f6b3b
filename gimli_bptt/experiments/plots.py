# SPDX-License-Identifier: Apache-2.0
"""The experiments' PNG figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from . import require_extras

COLORS = {"fixed": "tab:gray", "multistep": "tab:blue", "meta": "tab:red"}
STYLES = {"fixed": (0, (4, 2)), "multistep": "-", "meta": "-"}
LABELS = {"fixed": "fixed rate", "multistep": "multi-step annealing", "meta": "meta-learned per-group rates"}


def _pyplot() -> Any:
    require_extras()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lr_accuracy(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Test accuracy against epoch for every variant: mean over seeds, shaded ± one std."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for variant, recs in runs.items():
        epochs = np.array([0] + recs[0]["epoch"])
        accs = np.array([[r["initial_test_acc"]] + r["test_acc"] for r in recs])
        mean = accs.mean(0)
        ax.plot(epochs, mean, color=COLORS.get(variant), linestyle=STYLES.get(variant, "-"), linewidth=1.8,
                label=LABELS.get(variant, variant), zorder=3 if variant == "fixed" else 2)
        if len(recs) > 1:
            std = accs.std(0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=COLORS.get(variant), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, float(min(np.min([r["test_acc"][-1] for rs in runs.values() for r in rs]) - 0.1, 0.8))),
                1.0)
    seeds = len(next(iter(runs.values())))
    ax.set_title(f"{title} ({seeds} seed{'s' if seeds > 1 else ''})" if title else "")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_rates(steps: Sequence[float], values: Sequence[Sequence[float]], names: Sequence[str], path: Path,
               xlabel: str, ylabel: str = "learned learning rate", title: str = "", log: bool = False) -> None:
    """One line per parameter group: ``values[t][g]`` against ``steps[t]``."""
    import numpy as np

    plt = _pyplot()
    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    cmap = plt.get_cmap("viridis")
    for g, name in enumerate(names):
        ax.plot(steps, v[:, g], color=cmap(g / max(1, len(names) - 1)), label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log and (v > 0).all():
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_rates(meta_run: dict[str, Any], path: Path) -> None:
    """The learned rate of every parameter group against epoch (one meta run)."""
    steps = [0] + meta_run["epoch"]
    values = [meta_run["initial_rates"]] + meta_run["rates"]
    plot_rates(steps, values, meta_run["group_names"], path, xlabel="epoch (one meta step each)",
               title=f"meta-learned per-group rates (seed {meta_run.get('seed', 0)})")





def plot_panels(steps: Sequence[float], panels: dict[str, Sequence[Sequence[float]]], names: Sequence[str],
                path: Path, xlabel: str, title: str = "") -> None:
    """One panel per learned hyperparameter (``lr``, ``beta1``, ...), one line per parameter group."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.0, 3.8), dpi=100, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (key, values) in zip(axes[0], panels.items()):
        v = np.asarray(values, dtype=float)
        for g, name in enumerate(names):
            ax.plot(steps, v[:, g], color=cmap(g / max(1, len(names) - 1)), label=name, linewidth=1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"learned {key}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_sweep(runs: dict[str, dict[str, list[dict[str, Any]]]], path: Path, title: str = "") -> None:
    """Final and best test accuracy against the initial rate (log axis), one curve per variant:
    mean over seeds, bars ± one std."""
    import numpy as np

    plt = _pyplot()
    rates = [float(r) for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=100)
    for ax, key, name in zip(axes, ("final_test_acc", "best_test_acc"), ("final", "best")):
        for variant in next(iter(runs.values())):
            vals = np.array([[r[key] for r in runs[rate][variant]] for rate in runs])
            std = vals.std(1, ddof=1) if vals.shape[1] > 1 else np.zeros(len(rates))
            ax.errorbar(rates, vals.mean(1), yerr=std, color=COLORS.get(variant), linestyle=STYLES.get(variant, "-"),
                        marker="o", capsize=3, label=LABELS.get(variant, variant))
        ax.set_xscale("log")
        ax.set_xlabel("initial learning rate")
        ax.set_ylabel(f"{name} test accuracy")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_sweep_worst(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """One initial rate: test accuracy against epoch per variant (mean, ± one std over seeds),
    and the meta-learned rate of every group against epoch (first seed)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), dpi=100)
    ax = axes[0]
    for variant, recs in runs.items():
        epochs = np.array([0] + recs[0]["epoch"])
        accs = np.array([[r["initial_test_acc"]] + r["test_acc"] for r in recs])
        mean = accs.mean(0)
        ax.plot(epochs, mean, color=COLORS.get(variant), linestyle=STYLES.get(variant, "-"), linewidth=1.8,
                label=LABELS.get(variant, variant))
        if len(recs) > 1:
            std = accs.std(0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=COLORS.get(variant), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    meta = runs["meta"][0]
    v = np.asarray([meta["initial_rates"]] + meta["rates"], dtype=float)
    cmap = plt.get_cmap("viridis")
    for g, name in enumerate(meta["group_names"]):
        axes[1].plot(range(len(v)), v[:, g], color=cmap(g / max(1, len(meta["group_names"]) - 1)), label=name,
                     linewidth=1.1)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(f"meta-learned rate (seed {meta.get('seed', 0)})")
    if (v > 0).all():
        axes[1].set_yscale("log")
    axes[1].grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_clean_weights(runs: Sequence[dict[str, Any]], path: Path, threshold: float) -> None:
    """Histograms of the learned example weights, clean against corrupted examples (all seeds pooled)."""
    import numpy as np

    plt = _pyplot()
    w = np.concatenate([np.asarray(r["weights"], dtype=float) for r in runs])
    bad = np.concatenate([np.asarray(r["corrupted"], dtype=bool) for r in runs])
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist(w[~bad], bins=bins, color="tab:blue", alpha=0.6, label=f"clean labels ({int((~bad).sum())})")
    ax.hist(w[bad], bins=bins, color="tab:red", alpha=0.6, label=f"corrupted labels ({int(bad.sum())})")
    ax.axvline(threshold, color="black", linestyle=(0, (4, 2)), linewidth=1.0, label=f"threshold {threshold:g}")
    ax.set_xlabel("learned example weight")
    ax.set_ylabel("training examples")
    ax.set_title(f"learned weights, {len(runs)} seed{'s' if len(runs) > 1 else ''} pooled", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_clean_curves(runs: Mapping[str, Sequence[dict[str, Any]]], per_seed: Sequence[dict[str, float]],
                      path: Path) -> None:
    """Validation loss at θ'_J and test accuracy of the retrained model against meta steps, one
    line per hypergradient (mean over seeds), with the baseline's and oracle's accuracy as references."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, (name, recs) in enumerate(runs.items()):
        loss = np.array([r["val_loss"] for r in recs]).mean(0)
        axes[0].plot(np.arange(1, len(loss) + 1), loss, color=cmap(i), label=name, linewidth=1.5)
        acc = np.array([r["test_acc"] for r in recs]).mean(0)
        axes[1].plot(recs[0]["eval_step"], acc, color=cmap(i), label=f"hyper-cleaned ({name})", linewidth=1.5)
    for row, style in (("baseline", (0, (4, 2))), ("oracle", ":")):
        axes[1].axhline(float(np.mean([r[row] for r in per_seed])), color="gray", linestyle=style, label=row)
    axes[0].set_xlabel("meta step")
    axes[0].set_ylabel("validation loss at θ'_J")
    axes[1].set_xlabel("meta step")
    axes[1].set_ylabel("test accuracy (retrained from θ_0)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"data hyper-cleaning, mean over {len(per_seed)} seed{'s' if len(per_seed) > 1 else ''}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SINE_COLORS = {"maml": "tab:blue", "metasgd": "tab:red", "maml-adam": "tab:green", "fomaml": "tab:gray"}


def plot_sine_steps(shots: Sequence[int], methods: Sequence[str], runs: Sequence[dict[str, Any]], path: Path,
                    labels: dict[str, str]) -> None:
    """Test MSE against the number of inner steps at test time (the MAML paper's Figure 2 view):
    one panel per K, one line per method (mean over seeds), bars: the 95% CI over test tasks."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shots), figsize=(4.0 * len(shots) + 0.6, 3.6), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], shots):
        top = 0.0
        for method in methods:
            recs = [r for r in runs if r["method"] == method and r["shots"] == k]
            if not recs:
                continue
            as_array = lambda key: np.array([[np.nan if v is None else v for v in r["test"][key]] for r in recs])
            mse = as_array("mse").mean(0)  # a diverged step (None) is not drawn
            ci = as_array("ci95").mean(0)
            top = max(top, 3.0 * float(mse[0]))
            steps = np.arange(len(mse))
            ax.errorbar(steps, mse, yerr=ci, color=SINE_COLORS.get(method), label=labels.get(method, method),
                        linewidth=1.5, capsize=2, marker="o", markersize=3)
        ax.set_title(f"{k}-shot")
        ax.set_xlabel("inner steps at test time")
        ax.set_ylabel("test MSE")
        ax.set_yscale("log")
        if top > 0:  # a diverging method leaves the frame upwards instead of stretching it
            ax.set_ylim(top=top)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("sinusoid regression: test MSE against inner steps (95% CI over test tasks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sine_tasks(runs: Sequence[dict[str, Any]], path: Path, labels: dict[str, str], shots: int,
                    seed: int) -> None:
    """A few test tasks of one K and seed: the true curve, the K support points, and every
    method's prediction before (dotted, θ_0) and after its inner steps (solid)."""
    plt = _pyplot()
    recs = [r for r in runs if r["shots"] == shots and r["seed"] == seed]
    n = len(recs[0]["examples"]["true"])
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n + 0.6, 3.4), dpi=100, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ex = recs[0]["examples"]
        ax.plot(ex["x"], ex["true"][i], color="black", linewidth=2.0, label="true")
        ax.scatter(ex["support_x"][i], ex["support_y"][i], color="black", marker="^", zorder=5,
                   label=f"{shots} support points")
        for r in recs:
            c = SINE_COLORS.get(r["method"])
            ax.plot(ex["x"], r["examples"]["before"][i], color=c, linestyle=":", linewidth=1.0)
            ax.plot(ex["x"], r["examples"]["after"][i], color=c, linewidth=1.4,
                    label=f"{labels.get(r['method'], r['method'])}, {r['examples']['steps']} step(s)")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("y")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(f"{shots}-shot test tasks after adaptation (dotted: before, at θ_0; seed {seed})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)


__all__ = ["plot_clean_curves", "plot_clean_weights", "plot_lr_accuracy", "plot_lr_rates", "plot_lr_sweep",
           "plot_lr_sweep_worst", "plot_panels", "plot_rates", "plot_sine_steps", "plot_sine_tasks"]
