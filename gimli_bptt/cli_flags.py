# SPDX-License-Identifier: Apache-2.0
"""The ``gimli-bptt`` command line's flags: the parser of every subcommand and the checks of each flag's value.

:mod:`gimli_bptt.__main__` runs what the parsed flags ask for; this module only parses and checks them, so
a bad value is one line naming the flag and the fix (exit status 2), before anything runs.
"""
from __future__ import annotations

import argparse
from typing import Callable, NoReturn

from .demo import DemoConfig

DIGITS_MIN_CLASS_SIZE = 174  # the smallest class of sklearn's digits (the 8s)
DIGITS_TOTAL = 1797  # sklearn's digits
SWEEP_EPOCHS = 10  # epochs of every run of `lr --sweep` unless --epochs says otherwise
#: the optional packages a subcommand may import, and how to install each
OPTIONAL_PACKAGES = {
    "sklearn": "pip install 'gimli_bptt[experiments]'  (or: pip install scikit-learn)",
    "matplotlib": "pip install 'gimli_bptt[experiments]'  (or: pip install matplotlib)",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem and where the usage is (exit status 2).

    Subcommands' parsers are of this class too (``add_subparsers`` makes them with the parent's class).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive comma-separated ints, got {text!r}")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}") from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected positive comma-separated learning rates, got {text!r}")
    return values


def _digit_classes(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated digits 0-9, got {text!r}") from None
    if not values or any(not 0 <= v <= 9 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated digits 0-9, got {text!r}")
    return values


def _optimizer_list(text: str) -> list[str]:
    values = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [v for v in values if v not in ("sgd", "adam")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of sgd, adam; got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    from .experiments.sine import METHODS

    values = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [v for v in values if v not in METHODS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(METHODS)}; got {text!r}")
    return values


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu, cuda or cuda:N)")
    return text


def _run_flags(p: argparse.ArgumentParser, out: str, seeds: int) -> None:
    """The flags every experiment shares: seeds, device, threads, output folder, progress bar."""
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="first seed")
    p.add_argument("--seeds", type=_positive(int), default=seeds,
                   help=f"number of seeds: --seed, --seed+1, ... (default {seeds})")
    p.add_argument("--device", type=_device, default="cpu", help="torch device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch CPU threads (default 1: fastest for these small models)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn on a terminal or in a notebook)")


def _resume_flags(p: argparse.ArgumentParser, unit: str, save_every: int) -> None:
    """``--resume`` and ``--save-every`` of the experiments that save a run state every ``save_every`` ``unit``."""
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from the states saved (atomically, every --save-every {unit} "
                        "and after every run) in OUT/state/")
    p.add_argument("--save-every", type=_positive(int), default=save_every,
                   help=f"{unit} between saved run states (default {save_every})")


def _compile_flag(p: argparse.ArgumentParser) -> None:
    """``--compile``: every meta step's inner and reverse steps as compiled graphs (``GimliUpdater(compile=True)``)."""
    p.add_argument("--compile", action="store_true",
                   help="run each inner and reverse step as one torch.compile graph (GimliUpdater(compile=True)): "
                        "the first meta step of each run compiles (seconds to a minute), later ones run faster; "
                        "the same hypergradients to rounding")


def _width_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=_positive(int), help="model size: channels of the conv net's first block")


def _hypergradient_list(text: str) -> list[str]:
    from .experiments.clean import hypergradient_options

    values = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of exact, first-order, truncate:K; got {text!r}")
    for v in values:
        try:
            hypergradient_options(v, None)  # K is checked against --unroll in _run_clean
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def _add_clean(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .experiments.clean import MODELS, CleanConfig

    cc = CleanConfig()
    c = sub.add_parser(
        "clean", help="data hyper-cleaning on the digits: one learned weight per training example, half the labels "
                      "corrupted (Franceschi et al., 2017)",
        description="Corrupts a fraction --noise of the labels of --train digits, learns one weight per training "
                    "example (the sigmoid of a logit) by exact hypergradients of the loss on --val clean digits "
                    "through J full-batch training steps from a fixed initial point, and compares the model "
                    "retrained with the learned weights against training on every example (baseline) and on the "
                    "clean examples only (oracle). Writes clean.md, clean.json, clean_weights.png and "
                    "clean_curves.png.")
    c.add_argument("--train", type=_positive(int), default=cc.train, help=f"training digits (default {cc.train})")
    c.add_argument("--val", type=_positive(int), default=cc.val, help=f"clean validation digits (default {cc.val})")
    c.add_argument("--noise", type=_fraction, default=cc.noise,
                   help=f"fraction of the training labels replaced by a different class (default {cc.noise})")
    c.add_argument("--model", choices=MODELS, default=cc.model,
                   help="linear: softmax regression (default); mlp: 64-hidden-10 with tanh")
    c.add_argument("--hidden", type=_positive(int), default=cc.hidden, help=f"MLP hidden width (default {cc.hidden})")
    c.add_argument("--unroll", "-J", type=_positive(int), default=cc.unroll,
                   help=f"J: full-batch training steps, unrolled at every meta step (default {cc.unroll})")
    c.add_argument("--optimizer", default=cc.optimizer,
                   help="inner torch.optim optimizer by name: sgd (default), adam, rmsprop, adamw, ...")
    c.add_argument("--lr", type=_positive(float), help="inner learning rate (default 1.0 for sgd, else 0.01)")
    c.add_argument("--weight-decay", type=float, default=cc.weight_decay,
                   help=f"inner weight decay, an L2 on the model (default {cc.weight_decay:g})")
    c.add_argument("--meta-lr", type=_positive(float), default=cc.meta_lr,
                   help=f"Adam learning rate of the meta step on the example logits (default {cc.meta_lr:g})")
    c.add_argument("--meta-steps", type=_positive(int), default=cc.meta_steps,
                   help=f"meta updates per run (default {cc.meta_steps})")
    c.add_argument("--threshold", type=_fraction, default=cc.threshold,
                   help="flag an example as corrupted when its learned weight is below this "
                        f"(default {cc.threshold:g}, where every weight starts)")
    c.add_argument("--hypergradient", type=_hypergradient_list, default=cc.hypergradients,
                   help="comma-separated from exact, first-order, truncate:K; several add a comparison table "
                        "(default exact)")
    c.add_argument("--eval-every", type=_positive(int), default=cc.eval_every,
                   help=f"meta steps between test-accuracy points of clean_curves.png (default {cc.eval_every})")
    _compile_flag(c)
    _run_flags(c, cc.out, len(cc.seeds))
    _resume_flags(c, "meta steps", cc.save_every)
    c.set_defaults(subparser=c)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line."""
    from .experiments.lr import DEFAULT_SWEEP, LRConfig
    from .experiments.maml import MAMLConfig
    from .experiments.sine import SineConfig

    parser = _Parser(prog="gimli-bptt", description="Exact hypergradients through unrolled training.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="meta-learn per-layer learning rates of a small MLP on a synthetic task")
    defaults = DemoConfig()
    d.add_argument("--meta-steps", type=_positive(int), default=defaults.meta_steps, help="number of meta steps")
    d.add_argument("--unroll", type=_positive(int), default=defaults.unroll, help="inner steps J per meta step")
    d.add_argument("--lr", type=_positive(float), default=defaults.lr, help="initial learning rate of every layer")
    d.add_argument("--meta-lr", type=_positive(float), default=defaults.meta_lr, help="Adam learning rate of the meta step")
    d.add_argument("--hidden", type=_positive(int), default=defaults.hidden, help="hidden width of the MLP")
    d.add_argument("--optimizer", choices=["sgd", "adam"], default=defaults.optimizer, help="inner optimizer")
    d.add_argument("--hvp", choices=["rev", "fwd"], default=defaults.hvp, help="Hessian-vector product mode")
    d.add_argument("--seed", type=int, default=defaults.seed)

    _add_clean(sub)

    lc = LRConfig()
    lr = sub.add_parser(
        "lr", help="digits: fixed rate vs multi-step annealing vs meta-learned per-group rates (paper 5.1)",
        description="Trains a small conv net on the scikit-learn digits three ways -- a fixed learning rate, "
                    "multi-step annealing (rate / 10 at 50% and 75% of the epochs) and meta-learned "
                    "per-parameter-group rates (one meta step per epoch: J unrolled steps on training batches, "
                    "loss on a held-out validation split) -- and writes lr_accuracy.png, lr_rates.png and lr.json.")
    lr.add_argument("--epochs", type=_positive(int),
                    help=f"training epochs (default {lc.epochs}; {SWEEP_EPOCHS} with --sweep)")
    lr.add_argument("--unroll", "-J", type=_positive(int), default=lc.unroll,
                    help=f"J: inner steps unrolled at each meta step (default {lc.unroll})")
    lr.add_argument("--optimizer", choices=["sgd", "adam"], default=lc.optimizer,
                    help="inner optimizer: SGD with momentum 0.9, or Adam (default sgd)")
    lr.add_argument("--lr", type=_positive(float), help="initial learning rate (default 0.1 for sgd, 0.003 for adam)")
    lr.add_argument("--meta-lr", type=_positive(float), help="Adam learning rate of the meta step (default lr / 10)")
    lr.add_argument("--batch-size", type=_positive(int), default=lc.batch_size,
                    help=f"training minibatch size (default {lc.batch_size})")
    lr.add_argument("--meta-batch-size", type=_positive(int), default=lc.meta_batch_size,
                    help=f"minibatch size of the unrolled steps (default {lc.meta_batch_size})")
    lr.add_argument("--val-frac", type=_fraction, default=lc.val_frac,
                    help=f"fraction of each class held out for the meta step's validation loss (default {lc.val_frac})")
    _width_flag(lr)
    _run_flags(lr, lc.out, len(lc.seeds))
    lr.add_argument("--dist-timeout", type=_positive(float), default=60.0,
                    help="under torchrun: seconds a rank waits for its peers before failing (default 60)")
    lr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from the state saved (atomically, after every epoch) in OUT/state/")
    lr.add_argument("--meta-every", type=_positive(int),
                    help="a meta step after every N real training steps (default: one after every epoch)")
    lr.add_argument("--sweep", type=_rate_list, nargs="?", const=list(DEFAULT_SWEEP), metavar="RATES",
                    help="instead of the three variants: fixed vs meta-learned rates from each initial rate in "
                         "RATES (comma-separated; default " + ",".join(f"{r:g}" for r in DEFAULT_SWEEP) + "), "
                         "writing lr_sweep.json, lr_sweep.md, lr_sweep.png and lr_sweep_worst.png")
    lr.set_defaults(width=lc.width, subparser=lr)

    mc = MAMLConfig()
    m = sub.add_parser(
        "maml", help="digits few-shot: MAML with inner SGD vs inner Adam, learned per-group rates (paper 5.2)",
        description="Meta-learns the initial weights (MAML) of a small conv net on N-way K-shot tasks from the "
                    "digit classes --train-classes, with inner SGD (learned per-group rates) and inner Adam "
                    "(learned per-group rates and betas), and tests on tasks from the held-out --test-classes. "
                    "Writes maml.md, maml.json and maml_rates_<optimizer>.png.")
    m.add_argument("--ways", type=_positive(int), default=mc.ways, help=f"N: classes per task (default {mc.ways})")
    m.add_argument("--shots", type=_int_list, default=mc.shots,
                   help="K values, comma-separated: support examples per class (default 1,5)")
    m.add_argument("--queries", type=_positive(int), default=mc.queries,
                   help=f"query examples per class (default {mc.queries})")
    m.add_argument("--unroll", "-J", type=_positive(int), default=mc.unroll,
                   help=f"J: inner steps, in training and at test time (default {mc.unroll})")
    m.add_argument("--meta-steps", type=_positive(int), default=mc.meta_steps,
                   help=f"meta updates per run (default {mc.meta_steps})")
    m.add_argument("--meta-batch", type=_positive(int), default=mc.meta_batch,
                   help=f"tasks per meta update (default {mc.meta_batch})")
    m.add_argument("--optimizer", dest="optimizers", type=_optimizer_list, default=mc.optimizers,
                   help="inner optimizers, comma-separated from sgd, adam (default sgd,adam)")
    m.add_argument("--inner-lr", type=_positive(float), help="initial inner learning rate (default 0.1 sgd, 0.01 adam)")
    m.add_argument("--meta-lr", type=_positive(float), default=mc.meta_lr,
                   help=f"Adam learning rate of the meta step (default {mc.meta_lr})")
    m.add_argument("--holdout", choices=["samples", "classes"], default=mc.holdout,
                   help="meta-test on held-out examples of all classes (samples, default) or on the held-out "
                        "--test-classes (classes)")
    m.add_argument("--train-classes", type=_digit_classes, default=mc.train_classes,
                   help="digit classes of meta-training tasks (default 0,1,2,3,4)")
    m.add_argument("--test-classes", type=_digit_classes, default=mc.test_classes,
                   help="held-out digit classes of meta-test tasks (default 5,6,7,8,9)")
    m.add_argument("--test-tasks", type=_positive(int), default=mc.test_tasks,
                   help=f"meta-test tasks per run (default {mc.test_tasks})")
    m.add_argument("--fixed-rates", action="store_true",
                   help="meta-learn only the initial weights; the inner optimizer keeps its initial rates (and betas)")
    m.add_argument("--eval-every", type=_positive(int),
                   help="also score the meta-test tasks (and, with --holdout classes, tasks from held-out examples of "
                        "the training classes) before meta-training and every N meta steps")
    _width_flag(m)
    _run_flags(m, mc.out, len(mc.seeds))
    _resume_flags(m, "meta steps", mc.save_every)
    m.set_defaults(width=mc.width, subparser=m)

    sc = SineConfig()
    sn = sub.add_parser(
        "sine", help="K-shot sinusoid regression: MAML, Meta-SGD, MAML with inner Adam, FOMAML, beside the "
                     "published numbers",
        description="Meta-trains a 1-40-40-1 ReLU MLP on K-shot sinusoid regression (MAML, Finn et al. 2017; "
                    "Meta-SGD, Li et al. 2017): MAML (learned initial weights, fixed inner rate), Meta-SGD (and a "
                    "learned rate per weight), MAML with inner Adam (learned per-tensor lr and betas) and FOMAML "
                    "(first-order), each through GimliUpdater(..., tasks=25). Scores every method on fixed test "
                    "tasks with a 95%% confidence interval and writes sine.md (beside the published numbers), "
                    "sine.json, sine_steps.png and sine_tasks.png. The default run takes about 1.5 minutes on 2 "
                    "cores; --iterations 70000 is the MAML code's scale.")
    sn.add_argument("--shots", type=_int_list, default=sc.shots, help="K values, comma-separated (default 5,10,20)")
    sn.add_argument("--iterations", type=_positive(int), default=sc.iterations,
                    help=f"meta updates per run (default {sc.iterations}; the papers: 70000)")
    sn.add_argument("--methods", type=_method_list, default=sc.methods,
                    help="comma-separated from maml, metasgd, maml-adam, fomaml (default all)")
    sn.add_argument("--meta-batch", type=_positive(int), default=sc.meta_batch,
                    help=f"tasks per meta update (default {sc.meta_batch})")
    sn.add_argument("--unroll", "-J", type=_positive(int), default=sc.unroll,
                    help=f"J: inner steps in meta-training; the table is scored after J steps (default {sc.unroll})")
    sn.add_argument("--inner-lr", type=_positive(float), default=sc.inner_lr,
                    help=f"inner rate: fixed for maml/fomaml, initial for maml-adam (default {sc.inner_lr:g}, the "
                         "MAML paper's; its code uses 0.001)")
    sn.add_argument("--meta-lr", type=_positive(float), default=sc.meta_lr,
                    help=f"Adam learning rate of the meta step (default {sc.meta_lr:g})")
    sn.add_argument("--test-tasks", type=_positive(int), default=sc.test_tasks,
                    help=f"fixed test tasks (default {sc.test_tasks})")
    sn.add_argument("--test-steps", type=_positive(int), default=sc.test_steps,
                    help=f"inner steps at test time for the MSE-against-steps plot (default {sc.test_steps})")
    _compile_flag(sn)
    _run_flags(sn, sc.out, len(sc.seeds))
    _resume_flags(sn, "iterations", sc.save_every)

    bk = sub.add_parser(
        "build-kernels", help="compile the fused optimizer kernels now (once per torch version) and say where they went",
        description="Compiles the fused optimizer kernels for this torch, unless a build is already there (from "
                    "the install or the cache), loads them, and reports what is loaded, from where and for which "
                    "devices. Exits 1 when they cannot be built, saying why.")
    bk.add_argument("--info", action="store_true",
                    help="only report what is loaded, from where, for which devices, and why not (compiles nothing)")
    bk.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    return parser
