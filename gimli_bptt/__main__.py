# SPDX-License-Identifier: Apache-2.0
"""The ``gimli-bptt`` command line (also ``python -m gimli_bptt``): ``demo``, ``clean``, ``lr``, ``maml``, ``sine`` and
``build-kernels``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from .cli_flags import DIGITS_MIN_CLASS_SIZE, DIGITS_TOTAL, OPTIONAL_PACKAGES, SWEEP_EPOCHS, build_parser
from .demo import DemoConfig, run_demo
from .errors import GimliError


def _run_build_kernels(args: argparse.Namespace) -> int:
    """``build-kernels``: compiles and loads the kernels (or, with ``--info``, only reports); 0 when they are loaded."""
    from .kernels import ops

    if args.info:
        print(ops.info())
        return 0
    try:
        report = ops.build(verbose=args.verbose)
    except ops.KernelsUnavailable as exc:
        print(f"gimli-bptt build-kernels: error: {exc}", file=sys.stderr)
        return 1
    print(report)
    cause = getattr(ops.load_error(), "__cause__", None)
    if not report.loaded and cause is not None:  # the compiler's own words
        print(str(cause)[-8000:], file=sys.stderr)
    return 0 if report.loaded else 1


def _run_clean(args: argparse.Namespace) -> None:
    from .experiments.clean import CleanConfig, hypergradient_options, optimizer_class, run_clean

    parser: argparse.ArgumentParser = args.subparser
    try:
        optimizer_class(args.optimizer)
    except ValueError as exc:
        parser.error(f"argument --optimizer: {exc}")
    for h in args.hypergradient:
        try:
            hypergradient_options(h, args.unroll)
        except ValueError as exc:
            parser.error(f"argument --hypergradient: {exc}")
    if args.train + args.val >= DIGITS_TOTAL:
        parser.error(f"argument --train/--val: {args.train} + {args.val} leaves no test digits of the {DIGITS_TOTAL}")
    cfg = CleanConfig(train=args.train, val=args.val, noise=args.noise, model=args.model, hidden=args.hidden,
                      unroll=args.unroll, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                      meta_lr=args.meta_lr, meta_steps=args.meta_steps, threshold=args.threshold,
                      hypergradients=args.hypergradient, eval_every=args.eval_every,
                      seeds=list(range(args.seed, args.seed + args.seeds)), device=args.device, threads=args.threads,
                      out=args.out, progress=False if args.no_progress else None, resume=args.resume,
                      save_every=args.save_every, compile=args.compile)
    run_clean(cfg)


def _run_lr(args: argparse.Namespace) -> None:
    from .experiments.lr import LRConfig, run_lr, run_lr_sweep

    if args.sweep and args.lr is not None:
        args.subparser.error("argument --lr: not with --sweep, whose RATES are the initial rates")
    epochs = args.epochs if args.epochs is not None else (SWEEP_EPOCHS if args.sweep else LRConfig().epochs)
    cfg = LRConfig(epochs=epochs, unroll=args.unroll, width=args.width, optimizer=args.optimizer, lr=args.lr,
                   meta_lr=args.meta_lr, batch_size=args.batch_size, meta_batch_size=args.meta_batch_size,
                   val_frac=args.val_frac, seeds=list(range(args.seed, args.seed + args.seeds)),
                   device=args.device, threads=args.threads, out=args.out,
                   progress=False if args.no_progress else None, resume=args.resume, meta_every=args.meta_every)
    if args.sweep:
        run_lr_sweep(cfg, args.sweep)
    else:
        run_lr(cfg)


def _run_maml(args: argparse.Namespace) -> None:
    from .experiments.maml import MAMLConfig, run_maml

    parser: argparse.ArgumentParser = args.subparser
    if args.holdout == "classes" and set(args.train_classes) & set(args.test_classes):
        parser.error("argument --test-classes: must not share classes with --train-classes "
                     f"({sorted(set(args.train_classes) & set(args.test_classes))})")
    if args.shots and max(args.shots) + args.queries > DIGITS_MIN_CLASS_SIZE:
        parser.error(f"argument --shots/--queries: a digit class has only {DIGITS_MIN_CLASS_SIZE} examples, "
                     f"fewer than shots + queries = {max(args.shots) + args.queries}")
    pools = ((("--train-classes", args.train_classes), ("--test-classes", args.test_classes))
             if args.holdout == "classes" else
             (("--train-classes/--test-classes", sorted(set(args.train_classes) | set(args.test_classes))),))
    for flag, classes in pools:
        if args.ways > len(classes):
            parser.error(f"argument --ways: {args.ways}-way tasks need at least {args.ways} classes in {flag}, "
                         f"which has {len(classes)}")
    cfg = MAMLConfig(ways=args.ways, shots=args.shots, queries=args.queries, unroll=args.unroll,
                     meta_steps=args.meta_steps, meta_batch=args.meta_batch, width=args.width,
                     optimizers=args.optimizers, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
                     holdout=args.holdout, train_classes=args.train_classes, test_classes=args.test_classes, test_tasks=args.test_tasks,
                     seeds=list(range(args.seed, args.seed + args.seeds)), device=args.device,
                     threads=args.threads, out=args.out, progress=False if args.no_progress else None,
                     learn_rates=not args.fixed_rates, eval_every=args.eval_every, resume=args.resume,
                     save_every=args.save_every)
    run_maml(cfg)


def _run_sine(args: argparse.Namespace) -> None:
    from .experiments.sine import SineConfig, run_sine

    cfg = SineConfig(shots=args.shots, iterations=args.iterations, methods=args.methods, meta_batch=args.meta_batch,
                     unroll=args.unroll, inner_lr=args.inner_lr, meta_lr=args.meta_lr, test_tasks=args.test_tasks,
                     test_steps=args.test_steps, seeds=list(range(args.seed, args.seed + args.seeds)),
                     device=args.device, threads=args.threads, out=args.out,
                     progress=False if args.no_progress else None, resume=args.resume, save_every=args.save_every,
                     compile=args.compile)
    run_sine(cfg)


def _distributed(run: Callable[[], None], timeout_s: float) -> int:
    """Runs ``run`` in a torch.distributed process group when started by torchrun (WORLD_SIZE > 1).

    Each rank holds a shard of every meta batch; GimliUpdater averages over the ranks
    (docs/DISTRIBUTED.md). A failed or timed-out peer ends every rank with exit status 1.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        run()
        return 0
    import datetime

    import torch
    import torch.distributed as dist

    from .errors import DistributedError

    backend = "nccl" if torch.cuda.is_available() and os.environ.get("GIMLI_DIST_BACKEND") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        run()
    except DistributedError as exc:
        print(f"gimli-bptt (rank {dist.get_rank()}): error: {exc}", file=sys.stderr)
        return 1  # no destroy_process_group(): it can block after a timeout
    dist.destroy_process_group()
    return 0


def _fail(command: str, problem: str) -> int:
    """Prints ``problem`` as one line on stderr (its own line breaks joined) and returns exit status 2."""
    print(f"gimli-bptt {command}: error: {' '.join(problem.split())}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``gimli-bptt``; returns the exit status.

    Every subcommand's failures that are the user's to fix end in one line on stderr and exit
    status 2, with no traceback: a bad flag value (argparse, :class:`_Parser`), an error the
    package raises on purpose (:class:`~gimli_bptt.errors.GimliError`: a run state it cannot
    read, missing extras, a non-finite loss, ...; the compiled kernels' ``KernelsUnavailable``),
    and a missing optional package (:data:`OPTIONAL_PACKAGES`). Anything else is a bug and keeps
    its traceback.
    """
    from .kernels.ops import KernelsUnavailable

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (GimliError, KernelsUnavailable) as exc:
        return _fail(args.command, str(exc))
    except ImportError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        return _fail(args.command, f"the optional package {package} is not installed ({exc}); "
                                   f"install it: {OPTIONAL_PACKAGES[package]}")


def _dispatch(args: argparse.Namespace) -> int:
    """Runs the subcommand ``args.command``; returns the exit status."""
    if args.command == "demo":
        cfg = DemoConfig(meta_steps=args.meta_steps, unroll=args.unroll, lr=args.lr, meta_lr=args.meta_lr,
                         hidden=args.hidden, optimizer=args.optimizer, hvp=args.hvp, seed=args.seed)
        run_demo(cfg)
        return 0
    if args.command == "build-kernels":
        return _run_build_kernels(args)
    from .experiments import require_extras

    require_extras()  # MissingExtraError (a GimliError) names every missing package at once
    if args.command == "lr":
        return _distributed(lambda: _run_lr(args), args.dist_timeout)
    elif args.command == "clean":
        _run_clean(args)
    elif args.command == "maml":
        _run_maml(args)
    elif args.command == "sine":
        _run_sine(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
