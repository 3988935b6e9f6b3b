# SPDX-License-Identifier: Apache-2.0
"""φ_opt: the inner optimizer's learned hyperparameters, at group, tensor or element granularity: the ``learn=``
option parsed against the optimizer's declaration, their values, their cotangents' accumulation, projection and
write-back."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # φ stands below the optimizers' contract and the stepping that produces its cotangents
    from ..optim.base import DiffOptimizer
    from ..stepping import SegmentBars

GRANULARITIES = ("group", "tensor", "element")

def parse_learn(impl: DiffOptimizer, learn: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Validates the ``learn`` option and returns ``{hyperparameter: granularity}``.

    A sequence of names means ``"group"`` granularity for each.

    Raises:
        TypeError: ``learn`` is not a dict or a sequence of names.
        ValueError: a name the optimizer does not have, a flag that is not a float, or an
            unknown granularity.
    """
    if learn is None:
        return {}
    if isinstance(learn, str):
        raise TypeError(f"learn must be a dict like {{'{learn}': 'group'}} or a list of names, not the string {learn!r}")
    if not isinstance(learn, Mapping):
        learn = {name: "group" for name in learn}
    out: dict[str, str] = {}
    for name, gran in learn.items():
        if name not in impl.hyper_names:
            learnable = ", ".join(impl.hyper_names)
            flag = impl.flag(name)
            if flag is not None and flag.kind is bool:
                why = f"'{name}' is a boolean option of {impl.name}, not a float hyperparameter"
                why += f" ({flag.why})" if flag.why else ""
            elif flag is not None:
                why = f"'{name}' is a fixed option of {impl.name}" + (f": {flag.why}" if flag.why else "")
            elif name == "betas" and "beta1" in impl.hyper_names:
                why = f"{impl.name}'s betas are learned one at a time: use 'beta1' and/or 'beta2'"
            else:
                why = f"{impl.name} has no hyperparameter '{name}'"
            raise ValueError(f"cannot learn {name!r}: {why}. Learnable hyperparameters of {impl.name}: {learnable}")
        if gran not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {gran!r} for {name!r}: use one of {', '.join(repr(g) for g in GRANULARITIES)}"
            )
        out[name] = gran
    return out


class OptimizerHyperparameters:
    """The learned hyperparameters φ_opt of an inner optimizer, and the fixed ones.

    Values are leaf tensors that the meta optimizer updates: for ``"group"`` a tensor of shape
    ``(num_groups,)``, for ``"tensor"`` one of shape ``(num_params,)`` (inner parameters in the
    module's order), for ``"element"`` one tensor per inner parameter, shaped like it.
    :meth:`per_param` expands them into the per-tensor hyperparameter dicts that
    ``DiffOptimizer.step`` takes, and :meth:`accumulate` sums per-tensor cotangents back
    (Algorithm 1, line 12: :math:`A^{opt} \\mathrel{+}= \\ldots`).

    Args:
        impl: The differentiable optimizer.
        groups: The inner optimizer's ``param_groups``.
        params: The inner parameters, in the module's order.
        learn: ``{hyperparameter: granularity}`` from :func:`parse_learn`.
    """

    def __init__(self, impl: DiffOptimizer, groups: Sequence[Mapping[str, Any]], params: Sequence[Tensor],
                 learn: Mapping[str, str]):
        self.impl = impl
        self.learn = dict(learn)
        index = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
        self.group_of = [index[id(p)] for p in params]
        self.num_groups = len(groups)
        self.fixed = [impl.read_hyper(groups[g]) for g in self.group_of]
        self._index_cache: dict[tuple[str, tuple[int, ...]], Tensor] = {}
        ref = params[0]
        self.values: dict[str, Tensor | list[Tensor]] = {}
        for name, gran in self.learn.items():
            group_values = [impl.read_hyper(group)[name] for group in groups]
            if gran == "group":
                value: Tensor | list[Tensor] = torch.tensor(group_values, dtype=ref.dtype, device=ref.device)
            elif gran == "tensor":
                value = torch.tensor([group_values[g] for g in self.group_of], dtype=ref.dtype, device=ref.device)
            else:
                value = [torch.full_like(p, group_values[g]).detach() for p, g in zip(params, self.group_of)]
            self.values[name] = value
        for t in self.leaves():
            t.requires_grad_(True)

    def leaves(self) -> list[Tensor]:
        """Every learned tensor, in a fixed order (the meta optimizer's parameters)."""
        out: list[Tensor] = []
        for value in self.values.values():
            out.extend(value if isinstance(value, list) else [value])
        return out

    def named_leaves(self, param_names: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)``: ``"lr"`` for group/tensor values, ``"lr.<parameter>"`` per element."""
        for name, value in self.values.items():
            if isinstance(value, list):
                for pname, t in zip(param_names, value):
                    yield f"{name}.{pname}", t
            else:
                yield name, value

    def per_param(self, values: Mapping[str, Tensor | list[Tensor]] | None = None,
                  detach: bool = True) -> list[dict[str, Any]]:
        """The hyperparameter dict of every inner parameter, learned values as tensors.

        Args:
            values: Values to expand instead of :attr:`values` (e.g. a differentiable copy).
            detach: Detach the learned values (the tape and the sweep need no autograd graph).
        """
        values = self.values if values is None else values
        out = []
        for k, (g, fixed) in enumerate(zip(self.group_of, self.fixed)):
            h = dict(fixed)
            for name, gran in self.learn.items():
                t = values[name][g if gran == "group" else k]  # a row of (num_groups,) or (num_params,), or a tensor
                h[name] = t.detach() if detach else t
            out.append(h)
        return out

    def zeros(self) -> dict[str, Tensor | list[Tensor]]:
        """Zero accumulators shaped like the learned values (line 8, :math:`A^{opt}`)."""
        return {
            name: [torch.zeros_like(t).detach() for t in v] if isinstance(v, list) else torch.zeros_like(v).detach()
            for name, v in self.values.items()
        }

    def accumulate_all(self, acc: dict[str, Tensor | list[Tensor]],
                       hyper_bar: Sequence[Mapping[str, Tensor]] | SegmentBars) -> None:
        """Adds every parameter's hyperparameter cotangents into ``acc`` ([Alg.1 L12]): ``hyper_bar[k]``
        holds parameter ``k``'s, as :meth:`accumulate` takes them, or ``hyper_bar`` is the
        :class:`~gimli_bptt.stepping.SegmentBars` of a flat VJP (one tensor per bucket and name).

        On the CPU a group- or tensor-granularity name takes one ``index_add_`` per list of
        cotangents, which adds in the order of the parameters, as :meth:`accumulate` does one by
        one; elsewhere (where ``index_add_`` may add concurrently, in no fixed order) and for
        element granularity it is :meth:`accumulate` per parameter.
        """
        if not isinstance(hyper_bar, Sequence):  # SegmentBars
            self._accumulate_segments(acc, hyper_bar.segments)
            hyper_bar = hyper_bar.per_tensor
        for name, gran in self.learn.items():
            a = acc[name]
            if gran == "element" or not isinstance(a, Tensor) or a.device.type != "cpu":
                for k, bars in enumerate(hyper_bar):
                    if name in bars:
                        self.accumulate(acc, k, {name: bars[name]})
                continue
            ks = [k for k, bars in enumerate(hyper_bar) if name in bars]
            if not ks:
                continue
            a.index_add_(0, self._rows(gran, tuple(ks)), torch.stack([hyper_bar[k][name] for k in ks]).to(a.dtype))

    def _rows(self, gran: str, ks: tuple[int, ...]) -> Tensor:
        """The rows of a group- or tensor-granularity value that parameters ``ks`` add into (cached)."""
        index = self._index_cache.get((gran, ks))
        if index is None:
            rows = [self.group_of[k] for k in ks] if gran == "group" else list(ks)
            index = self._index_cache[(gran, ks)] = torch.tensor(rows, dtype=torch.int64)
        return index

    def _accumulate_segments(self, acc: dict[str, Tensor | list[Tensor]],
                             segments: Sequence[tuple[tuple[int, ...], str, int, Tensor, Any]]) -> None:
        for ks, name, kind, bar, views in segments:
            gran = self.learn.get(name)
            if gran is None:
                continue
            a = acc[name]
            if kind == 2:  # element-wise: one view per parameter
                for k, v in zip(ks, views):
                    self.accumulate(acc, k, {name: v})
            elif gran == "element":  # (a 0-d value is never element granularity; kept for safety)
                for k, v in zip(ks, bar.unbind(0)):
                    self.accumulate(acc, k, {name: v})
            elif isinstance(a, Tensor) and a.device.type == "cpu":
                a.index_add_(0, self._rows(gran, ks), bar.to(a.dtype))
            else:
                for k, v in zip(ks, bar.unbind(0)):
                    self.accumulate(acc, k, {name: v})

    def accumulate(self, acc: dict[str, Tensor | list[Tensor]], k: int, bars: Mapping[str, Tensor]) -> None:
        """Adds the cotangents of parameter ``k``'s hyperparameters into ``acc`` (line 12)."""
        for name, bar in bars.items():
            gran = self.learn.get(name)
            if gran is None:
                continue
            a = acc[name]
            if gran == "group":
                a[self.group_of[k]] += bar
            elif gran == "tensor":
                a[k] += bar
            else:  # a cotangent with a leading (task) dimension sums over it
                a[k].add_(bar if bar.shape == a[k].shape else bar.sum_to_size(a[k].shape))

    @torch.no_grad()
    def project(self) -> None:
        """Clamps learned values into their declared range (lr ≥ 0, 0 ≤ beta < 1, eps > 0, ...).

        This is projected gradient descent on φ_opt: a meta step that would take a value out
        of range (a negative learning rate, a beta of 1) lands on the boundary instead.
        """
        for name, value in self.values.items():
            declared = self.impl.hyperparameter(name)
            for t in value if isinstance(value, list) else [value]:
                declared.project_(t)

    def write_back(self, groups: Sequence[dict[str, Any]]) -> None:
        """Writes group-granularity values into ``param_groups`` (so ``opt.step()`` uses them)."""
        for name, gran in self.learn.items():
            if gran != "group":
                continue
            for g, group in enumerate(groups):
                value = float(self.values[name][g].detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"learned {name} of group {g} is {value}")
                self.impl.write_hyper(group, name, value)
        for k, g in enumerate(self.group_of):
            self.fixed[k] = self.impl.read_hyper(groups[g])


__all__ = ["GRANULARITIES", "OptimizerHyperparameters", "parse_learn"]
