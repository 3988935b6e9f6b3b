# SPDX-License-Identifier: Apache-2.0
"""Second-order terms of one inner step: H_j·Ḡ_j and (∂G_j/∂φ_loss)ᵀ·Ḡ_j ([Alg.1 L13], [Alg.1 L14]).

Both modes are exact and give the same numbers up to rounding:

- ``"rev"`` (reverse-over-reverse): recompute ℓ_j, take G_j with ``create_graph=True``, then
  one more backward pass with Ḡ_j as the cotangent.
- ``"fwd"`` (forward-over-reverse): one forward pass on dual tensors θ_j + ε·Ḡ_j and one
  backward pass; the tangents of the gradients are H_j·Ḡ_j and, by the symmetry of second
  derivatives, (∂G_j/∂φ_loss)ᵀ·Ḡ_j. It needs G_j before it runs (to compute Ḡ_j), so the
  tape keeps G_j in this mode.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import engine
from ._typing import Grads
from .options import HVP_MODES
from .problem import InnerProblem, StepGradient, replay_rng
from .second_order import explain_missing_derivatives
from .reverse.tape import TapeEntry


class StepSecondOrder:
    """The recomputed step j: its gradient G_j, and :meth:`apply` for the second-order terms."""

    def __init__(self, problem: InnerProblem, entry: TapeEntry, mode: str):
        if mode not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {mode!r}")
        self.problem = problem
        self.entry = entry
        self.mode = mode
        self._graph: Optional[StepGradient] = None
        if entry.kept is not None:  # kept from the forward pass: nothing to recompute
            self._graph = entry.kept
            self.mode = "rev"
            self.G: Grads = entry.kept.G
        elif mode == "rev":
            self._recompute_with_graph()
            assert self._graph is not None
            self.G = self._graph.G
        else:
            if entry.G is None:
                raise RuntimeError("the forward-over-reverse HVP needs G_j on the tape")
            self.G = entry.G

    def apply(self, G_bar: Sequence[Optional[Tensor]]) -> tuple[Grads, Grads]:
        """``(H_j·Ḡ_j per inner parameter, (∂G_j/∂φ_loss)ᵀ·Ḡ_j per loss leaf)``; None means zero.

        Distributed, Ḡ_j is the same on every rank; each rank applies its own loss's second
        derivatives and the results are averaged (one collective): the mean of the per-rank
        Hessians is the Hessian of the mean loss.
        """
        if self.mode == "rev":
            h_theta, h_loss = self._apply_rev(G_bar)
        else:
            h_theta, h_loss = self._apply_fwd(G_bar)
        if self.problem.reducer is None:
            return h_theta, h_loss
        n = len(h_theta)
        like = [t.detach() for t in self.entry.theta] + list(self.problem.loss_leaves)
        out = self.problem.all_reduce_mean([*h_theta, *h_loss], like,
                                           f"H_{self.entry.j}·Ḡ_{self.entry.j} and the mixed terms (inner step {self.entry.j})")
        return out[:n], out[n:]

    def _apply_rev(self, G_bar: Sequence[Optional[Tensor]]) -> tuple[Grads, Grads]:
        graph = self._graph
        assert graph is not None and graph.leaves is not None and graph.graph is not None
        n = len(graph.leaves)
        outs = [(g, gb) for g, gb in zip(graph.graph, G_bar) if g is not None and gb is not None and g.requires_grad]
        leaves = self.problem.loss_leaves
        self._graph = None  # free the graph once it has been used
        if not outs:
            return [None] * n, [None] * len(leaves)
        with explain_missing_derivatives(self.problem.module, self._loss_again,
                                         f"the Hessian-vector product of inner step {self.entry.j}"):
            res = engine.grad([g for g, _ in outs], graph.leaves + leaves, [gb for _, gb in outs])
        return list(res[:n]), list(res[n:])

    def _loss_again(self) -> None:
        """ℓ_j once more, forward only: where an op without a double backward runs (:mod:`gimli_bptt.second_order`)."""
        problem, entry = self.problem, self.entry
        problem.loss([t.detach().requires_grad_(True) for t in entry.theta], problem.fresh_buffers(entry.buffers),
                     entry.batch, entry.j)

    def _apply_fwd(self, G_bar: Sequence[Optional[Tensor]]) -> tuple[Grads, Grads]:
        # Note [Forward-mode fallback]: some PyTorch ops lack a forward-mode derivative of their
        # backward (in torch 2.13, F.mse_loss raises "ZeroTensors are immutable" when the target
        # has no tangent). Such a step is redone reverse-over-reverse, which is just as exact,
        # with one warning; ``problem.hvp_fallback`` makes the rest of the sweep skip the try.
        if not self.problem.hvp_fallback:
            try:
                return self._apply_dual(G_bar)
            except RuntimeError as exc:
                self.problem.hvp_fallback = True
                warnings.warn(
                    f"hvp='fwd': forward-mode AD failed inside train_loss ({str(exc).splitlines()[0][:120]}); "
                    "using the reverse-over-reverse HVP (hvp='rev') instead, which is equally exact",
                    RuntimeWarning, stacklevel=2,
                )
        self._recompute_with_graph()
        return self._apply_rev(G_bar)

    def _recompute_with_graph(self) -> None:
        """[Alg.1 L5] again at θ_j, with the graph of G_j (same generator state and buffers as the tape)."""
        problem, entry = self.problem, self.entry
        self._graph = problem.step_gradient(entry.theta, problem.fresh_buffers(entry.buffers), entry.batch, entry.j,
                                            rng=entry.rng, keep_graph=True)

    def _apply_dual(self, G_bar: Sequence[Optional[Tensor]]) -> tuple[Grads, Grads]:
        problem, entry = self.problem, self.entry
        primals = [t.detach().requires_grad_(True) for t in entry.theta]
        leaves = problem.loss_leaves
        n = len(primals)
        with fwAD.dual_level(), replay_rng(entry.rng, problem.cuda_devices), torch.enable_grad():
            duals = [fwAD.make_dual(p, torch.zeros_like(p) if gb is None else gb) for p, gb in zip(primals, G_bar)]
            with problem.safe_mode.second_order_pass():  # Note [Second-order-safe passes]
                loss = problem.loss(duals, problem.fresh_buffers(entry.buffers), entry.batch, entry.j)
            with explain_missing_derivatives(problem.module, self._loss_again,
                                             f"the forward-over-reverse Hessian-vector product of inner step {entry.j}"):
                grads = engine.grad((loss if loss.dim() == 0 else loss.sum(),), primals + leaves)
            tangents = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
        return tangents[:n], tangents[n:]


__all__ = ["StepSecondOrder"]
