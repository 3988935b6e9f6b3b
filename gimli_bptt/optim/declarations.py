# SPDX-License-Identifier: Apache-2.0
"""What an optimizer declares besides its hyperparameters: its fixed options (:class:`Flag`), its state
(:class:`StateEntry`), its fused flat-buffer layout (:class:`FlatLayout`), and the common declarations
(``lr``, ``eps``, ``betas``, ...) the optimizers share (Note [One declaration per optimizer] in
:mod:`gimli_bptt.optim.base`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .scalars import scalar_state_dtype


@dataclass(frozen=True)
class Flag:
    """An option of a param group that the step reads but that is not meta-learned.

    Attributes:
        name: The param-group key (and the key in ``hyper``).
        default: The value when a param group lacks the option.
        kind: How it is read (``bool``, or ``float``/``int`` for a fixed number such as ASGD's ``t0``).
        why: Why it cannot be learned, for the error message of ``learn={name: ...}``.
    """

    name: str
    default: Any = False
    kind: type = bool
    why: str = ""

    def read(self, group: Mapping[str, Any]) -> Any:
        return self.kind(group.get(self.name, self.default))


#: Makes the fresh value of one state entry from the parameter and its hyperparameters.
StateInit = Callable[[Tensor, Hyper], Tensor]


@dataclass(frozen=True)
class StateEntry:
    """One tensor entry of ``opt.state[p]``.

    Attributes:
        name: Its key, in ``torch.optim``'s naming (``exp_avg``).
        init: Its value in a fresh state: a fill value (0.0: zeros like the parameter), or a
            function ``init(param, hyper)``.
        scalar: A 0-d entry that ``torch.optim`` keeps in its scalar dtype (NAdam's
            ``mu_product``); a fill value then makes a 0-d tensor.
        lazy: Absent until the first step creates it (SGD's momentum buffer): a fresh state
            holds None.
        when: The entry exists only for these options (amsgrad's ``max_exp_avg_sq``).
    """

    name: str
    init: Union[float, StateInit] = 0.0
    scalar: bool = False
    lazy: bool = False
    when: Optional[Callable[[Hyper], bool]] = None

    def fresh(self, param: Tensor, hyper: Hyper) -> Optional[Tensor]:
        if self.lazy:
            return None
        if callable(self.init):
            return self.init(param, hyper).detach()
        if self.scalar:
            return torch.full((), float(self.init), dtype=scalar_state_dtype(param), device=param.device)
        return torch.full_like(param, float(self.init), memory_format=torch.preserve_format).detach()

    def copy(self, value: Any, param: Tensor) -> Tensor:
        if self.scalar:
            return torch.as_tensor(value).detach().to(dtype=scalar_state_dtype(param), device=param.device).clone()
        return value.detach().clone()


@dataclass(frozen=True)
class FlatLayout:
    """How one optimizer's per-tensor contract maps onto a pair of fused flat-buffer ops.

    The ops ``<op>_step`` and ``<op>_step_vjp`` (``torch.ops.gimli`` and their pure-PyTorch twin
    in :mod:`gimli_bptt.kernels._reference`) take many tensors laid end to end; a *bucket* of
    tensors shares the op's static options (Note [Flat buffers] in ``kernels/flat.py``).
    The step op is called as ``step(θ, G, *state_in, offsets, hyper, elementwise, *args)`` and
    returns ``(θ', *state_out)``; the VJP op as ``vjp(θ, G, *state_in, θ̄', *bar_in, offsets,
    hyper, elementwise, learned, *args)`` and returns ``(θ̄, Ḡ, *bar_out, hyper_bars)``. A
    name of None in those lists is an absent buffer (passed as None, ignored on return).

    Attributes:
        op: The op pair's name stem (``"adam"``).
        hyper: The hyperparameter slots, in the op's order.
        options: ``options(hyper, state)`` of one tensor: the op's static options (a tuple);
            tensors with different options go to different buckets.
        state_in: ``state_in(options)``: the state entries the ops read.
        state_out: ``state_out(options)``: the state entries the step op returns.
        bar_in: ``bar_in(options)``: the carried state cotangents the VJP op reads.
        bar_out: ``bar_out(options)``: the state cotangents it returns.
        args: ``args(options, t)``: the trailing scalar arguments (``t`` is the step count of
            the step being taken when ``counter`` is set, else None).
        counter: The state's step count (``"step"``), read per call and advanced by one, or None.
        cpu_loop_below: Under ``kernels="auto"``, a call on CPU tensors that hold fewer elements
            than this in all runs the per-tensor functions instead of the flat ops (0: never),
            if ``cpu_loop_if`` holds for every tensor's hyperparameters.
            See Note [Small steps run per tensor] in :mod:`gimli_bptt.stepping`.
        cpu_loop_if: ``cpu_loop_if(hyper)``: whether a tensor with these hyperparameters is cheap
            enough per tensor for ``cpu_loop_below`` (None: always).
    """

    op: str
    hyper: tuple[str, ...]
    options: Callable[[Hyper, State], tuple]
    state_in: Callable[[tuple], tuple[Optional[str], ...]]
    state_out: Callable[[tuple], tuple[Optional[str], ...]]
    bar_in: Callable[[tuple], tuple[Optional[str], ...]]
    bar_out: Callable[[tuple], tuple[Optional[str], ...]]
    args: Callable[[tuple, Optional[float]], tuple]
    counter: Optional[str] = None
    cpu_loop_below: int = 0
    cpu_loop_if: Optional[Callable[[Hyper], bool]] = None



# ---------------------------------------------------------------------------- common declarations
def lr(**kw: Any) -> Hyperparameter:
    return Hyperparameter("lr", doc="learning rate", **kw)


def weight_decay(**kw: Any) -> Hyperparameter:
    return Hyperparameter("weight_decay", doc="weight decay", **kw)


def eps(**kw: Any) -> Hyperparameter:
    return Hyperparameter("eps", open_low=True, doc="the term that keeps a denominator away from 0", **kw)


def betas(first: str = "beta1", second: str = "beta2") -> tuple[Hyperparameter, Hyperparameter]:
    """Adam-style ``betas=(beta1, beta2)``, each in [0, 1)."""
    return (Hyperparameter(first, option="betas", index=0, high=1.0, open_high=True, doc="first-moment decay"),
            Hyperparameter(second, option="betas", index=1, high=1.0, open_high=True, doc="second-moment decay"))


MAXIMIZE = Flag("maximize")

#: The domain a hyperparameter registered by name alone gets (register_optimizer), by convention.
CONVENTIONAL: dict[str, Hyperparameter] = {
    h.name: h for h in (lr(), weight_decay(), eps(), *betas(),
                        Hyperparameter("momentum", high=1.0), Hyperparameter("dampening", high=1.0))
}


def unit_interval(name: str, **kw: Any) -> Hyperparameter:
    """A decay rate in [0, 1] (momentum, rho, alpha)."""
    return Hyperparameter(name, high=1.0, **kw)


def declared(names: Sequence[Union[str, Hyperparameter]]) -> tuple[Hyperparameter, ...]:
    """Hyperparameters from declarations or bare names: a bare name is read as ``group[name]``
    and gets :data:`CONVENTIONAL`'s range when it has one (``beta1`` in [0, 1)), else no bound."""
    out = []
    for n in names:
        if isinstance(n, Hyperparameter):
            out.append(n)
        elif n in CONVENTIONAL:
            out.append(dataclasses.replace(CONVENTIONAL[n], option=None, index=None))
        else:
            out.append(Hyperparameter(n, low=None))
    return tuple(out)



__all__ = ["CONVENTIONAL", "MAXIMIZE", "Flag", "FlatLayout", "StateEntry", "StateInit", "betas", "declared", "eps", "lr",
           "unit_interval", "weight_decay"]
