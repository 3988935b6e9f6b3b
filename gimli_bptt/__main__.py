# SPDX-License-Identifier: Apache-2.0
"""The ``gimli-bptt`` command line (also ``python -m gimli_bptt``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .demo import DemoConfig, run_demo


def _positive(kind: type) -> object:
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line."""
    parser = argparse.ArgumentParser(prog="gimli-bptt", description="Exact hypergradients through unrolled training.")
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``gimli-bptt``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        cfg = DemoConfig(meta_steps=args.meta_steps, unroll=args.unroll, lr=args.lr, meta_lr=args.meta_lr,
                         hidden=args.hidden, optimizer=args.optimizer, hvp=args.hvp, seed=args.seed)
        run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
