# SPDX-License-Identifier: Apache-2.0
"""Differentiable ``torch.optim.Muon``: momentum, Nesterov, Newton–Schulz orthogonalisation, weight decay, lr adjustment.

Note [Muon in the parameters' dtype]: ``torch.optim.Muon`` casts the update to bfloat16
before the Newton–Schulz iteration and runs all of it in bfloat16 (8 significant bits). The
step here runs the same iteration in the parameters' dtype, so in float64 it is the exact
arithmetic of torch's algorithm. It agrees with ``torch.optim.Muon`` only to bfloat16 rounding:
the orthogonalised update differs by 1e-2 to 1e-1 of its largest entry on small random
matrices, as each iteration multiplies the rounding of a small singular value by up to
:math:`a \\approx 3.4`; with given gradients the momentum buffers still agree to float64
rounding. It agrees to float64 rounding with torch's Muon whose cast is removed
(``tests/test_matrix_optimizers.py`` checks both, and that the cast is the only difference). The derivative is that of the exact-arithmetic iteration: the cast is taken as
the identity, as a straight-through estimator would take it; it has no derivative otherwise
(rounding is piecewise constant).

Note [Muon's kinks]: the iteration starts from :math:`X / \\max(\\lVert X \\rVert_F, \\epsilon)`
(torch's ``clamp(min=eps)``). The derivative follows the branch taken: through the norm when
:math:`\\lVert X \\rVert_F \\ge \\epsilon` (as autograd differentiates ``clamp``), else through
:math:`\\epsilon`, whose cotangent is then :math:`-\\langle \\bar X_0, X \\rangle / \\epsilon^2`.
The norm is not differentiable at :math:`X = 0`, but it is then never the branch taken while
:math:`\\epsilon > 0`. Everything else (the momentum, the polynomial iteration, the transpose
of a matrix with more rows than columns) is smooth.

Note [Per-element Newton–Schulz coefficients]: torch forms
:math:`X_{k} = a X + (b A + c A^2) X` with :math:`A = X X^\\top`. With one coefficient per
tensor the step does exactly that. With :math:`b` or :math:`c` learned per element (a tensor
shaped like the parameter) the iteration is written as the sum of its three terms, each
shaped like :math:`X`, :math:`X_k = a \\odot X + b \\odot (A X) + c \\odot (A (A X))`, which is
the same polynomial when the coefficients are shared; per-element values of :math:`a`,
:math:`\\epsilon` and of everything outside the iteration enter element-wise. A tensor
coefficient of a matrix with more rows than columns is transposed with it.

Note [Muon's non-matrix parameters]: Muon orthogonalises matrices; ``torch.optim.Muon``
rejects any other parameter when it is built, and the declaration's ``check_param`` rejects
one added later (``add_param_group``) when ``GimliUpdater`` is built.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .._typing import Hyper, State
from ..metaparams.declaration import Hyperparameter
from .adjoints import add_bar, add_dots, dense_dot, hyper_dot_of, is_learned, mul_dot, state_dot_of, zero_missing_bars
from .base import DiffOptimizer
from .declarations import Flag, StateEntry, eps, lr, unit_interval, weight_decay

_HYPER = ("lr", "weight_decay", "momentum", "eps", "ns_a", "ns_b", "ns_c")
_ADJUSTMENTS = ("original", "match_rms_adamw")


class LrAdjustment(str):
    """Muon's ``adjust_lr_fn``: ``"original"`` (also for None) or ``"match_rms_adamw"``."""

    def __new__(cls, value: Optional[str] = None) -> "LrAdjustment":
        value = "original" if value is None else str(value)
        if value not in _ADJUSTMENTS:
            raise ValueError(f"Muon's adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {value!r}")
        return super().__new__(cls, value)


def lr_ratio(shape: torch.Size, adjust_lr_fn: Optional[str]) -> float:
    """The factor of the learning rate for a parameter of ``shape``, as torch's ``_adjust_lr``.

    .. math::
        s = \\sqrt{\\max(1, A / B)} \\text{ (original)}, \\quad
        s = 0.2 \\sqrt{\\max(A, B)} \\text{ (match_rms_adamw)}
    """
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    raise ValueError(f"Muon's adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def _element(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0


def _orient(value: Any, transposed: bool) -> Any:
    """A per-element value in the frame of the iteration (transposed with the matrix)."""
    return value.mT if transposed and _element(value) else value


def _forward(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> dict[str, Any]:
    """Every intermediate of one step, the Newton–Schulz iterates included (shared by
    :func:`muon_step` and its VJP)."""
    mu, e = hyper["momentum"], hyper["eps"]
    buf_next = torch.lerp(state["momentum_buffer"], G, 1 - mu)
    update = torch.lerp(G, buf_next, mu) if hyper["nesterov"] else buf_next
    transposed = G.size(0) > G.size(1)
    a, b, c = (_orient(hyper[n], transposed) for n in ("ns_a", "ns_b", "ns_c"))
    expanded = _element(b) or _element(c)
    X = update.mT if transposed else update
    nu = torch.linalg.vector_norm(X)
    e = _orient(e, transposed)
    nu_wins = nu >= e
    N = torch.where(nu_wins, nu, e)
    iterates = [X / N]
    for _ in range(int(hyper["ns_steps"])):
        Xk = iterates[-1]
        A = Xk @ Xk.mT
        if expanded:
            P = A @ Xk
            iterates.append(a * Xk + b * P + c * (A @ P))
        else:
            iterates.append(a * Xk + (b * A + c * (A @ A)) @ Xk)
    O = iterates[-1].mT if transposed else iterates[-1]
    ratio = lr_ratio(theta.shape, hyper["adjust_lr_fn"])
    lr_, wd = hyper["lr"], hyper["weight_decay"]
    theta_next = theta * (1 - lr_ * wd) - (lr_ * ratio) * O
    return dict(buf_next=buf_next, update=update, transposed=transposed, coeffs=(a, b, c), expanded=expanded, X=X,
                nu=nu, e=e, nu_wins=nu_wins, N=N, iterates=iterates, O=O, ratio=ratio, theta_next=theta_next)


def muon_step(theta: Tensor, G: Tensor, state: State, hyper: Hyper) -> tuple[Tensor, State]:
    """One Muon step on one matrix, out of place, as ``torch.optim.Muon`` makes it (in the
    parameters' dtype: Note [Muon in the parameters' dtype]).

    .. math::
        B' &= B + (1 - \\mu)(G - B), \\quad
        u = G + \\mu (B' - G) \\text{ (Nesterov) or } B' \\\\
        X &= u^\\top \\text{ if } u \\text{ has more rows than columns, else } u \\\\
        X_0 &= X / \\max(\\lVert X \\rVert_F, \\epsilon), \\quad
        X_k = a X_{k-1} + (b A_k + c A_k^2) X_{k-1}, \\;
        A_k = X_{k-1} X_{k-1}^\\top \\quad (k = 1..K) \\\\
        O &= X_K \\text{ (transposed back)}, \\quad
        \\theta' = \\theta (1 - \\eta\\lambda) - \\eta s\\, O

    with :math:`s` = :func:`lr_ratio` of the shape and :math:`K` = ``ns_steps``.
    """
    f = _forward(theta, G, state, hyper)
    new_state: State = dict(state)
    new_state["momentum_buffer"] = f["buf_next"]
    return f["theta_next"], new_state


def muon_step_vjp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_next_bar: Tensor,
    state_next_bar: State,
) -> tuple[Tensor, Tensor, State, dict[str, Tensor]]:
    """Vector-Jacobian product of :func:`muon_step`, through the kept Newton–Schulz iterates.

    .. math::
        \\bar\\theta &= (1 - \\eta\\lambda) \\bar\\theta', \\quad
        \\bar\\eta = -\\langle \\lambda\\theta + s O, \\bar\\theta' \\rangle, \\quad
        \\bar\\lambda = -\\eta \\langle \\theta, \\bar\\theta' \\rangle, \\quad
        \\bar X_K = -\\eta s \\bar\\theta' \\text{ (transposed)} \\\\
        \\text{for } k &= K..1, \\text{ with } X = X_{k-1}, A = X X^\\top, \\bar B = \\bar X_k X^\\top: \\\\
        \\bar a &\\mathrel{+}= \\langle X, \\bar X_k \\rangle, \\quad
        \\bar b \\mathrel{+}= \\langle A, \\bar B \\rangle, \\quad
        \\bar c \\mathrel{+}= \\langle A^2, \\bar B \\rangle, \\quad
        \\bar A = b \\bar B + c (\\bar B A + A \\bar B) \\\\
        \\bar X_{k-1} &= a \\bar X_k + (b A + c A^2) \\bar X_k + (\\bar A + \\bar A^\\top) X \\\\
        \\bar X &= \\bar X_0 / N + [\\nu \\ge \\epsilon]\\, \\bar N X / \\nu, \\quad
        \\bar N = -\\langle \\bar X_0, X \\rangle / N^2, \\quad
        \\bar\\epsilon = [\\nu < \\epsilon]\\, \\bar N \\quad (\\nu = \\lVert X \\rVert_F) \\\\
        \\bar G &= (1 - \\mu) \\bar u + (1 - \\mu) \\bar B'_{tot}, \\quad
        \\bar B'_{tot} = \\bar B' + \\mu \\bar u, \\quad
        \\bar B = \\mu \\bar B'_{tot}, \\quad
        \\bar\\mu = \\langle B' - G, \\bar u \\rangle - \\langle G - B, \\bar B'_{tot} \\rangle

    (without Nesterov :math:`\\bar B'_{tot} = \\bar B' + \\bar u` and :math:`\\bar G` has no
    :math:`\\bar u` term). With per-element :math:`b, c` (Note [Per-element Newton–Schulz
    coefficients]), :math:`P = A X`, :math:`X_k = a X + b P + c A P`:
    :math:`\\bar b = \\bar X_k \\odot P`, :math:`\\bar c = \\bar X_k \\odot A P`,
    :math:`\\bar P = b \\bar X_k + A (c \\bar X_k)`, :math:`\\bar A = (c \\bar X_k) P^\\top + \\bar P X^\\top`,
    :math:`\\bar X_{k-1} = a \\bar X_k + A \\bar P + (\\bar A + \\bar A^\\top) X`.
    """
    f = _forward(theta, G, state, hyper)
    lr_, wd, mu = hyper["lr"], hyper["weight_decay"], hyper["momentum"]
    tb = theta_next_bar
    bars: dict[str, Tensor] = {}
    transposed, ratio, O = f["transposed"], f["ratio"], f["O"]

    # theta' = theta (1 - lr wd) - lr s O
    theta_bar = tb * (1 - lr_ * wd)
    add_bar(bars, hyper, "lr", lambda: -(wd * theta + ratio * O) * tb)
    add_bar(bars, hyper, "weight_decay", lambda: -lr_ * theta * tb)
    Xb = -(lr_ * ratio) * tb
    Xb = Xb.mT if transposed else Xb

    # the Newton-Schulz iterations, in reverse
    a, b, c = f["coeffs"]
    learned = {n: is_learned(hyper[n]) for n in ("ns_a", "ns_b", "ns_c")}
    coeff_bars: dict[str, Any] = {n: 0.0 for n in learned}
    for X in reversed(f["iterates"][:-1]):
        A = X @ X.mT
        if learned["ns_a"]:
            coeff_bars["ns_a"] = coeff_bars["ns_a"] + (Xb * X if _element(a) else (Xb * X).sum())
        if f["expanded"]:
            P = A @ X
            Q_bar = c * Xb
            P_bar = b * Xb + A @ Q_bar
            if learned["ns_b"]:
                coeff_bars["ns_b"] = coeff_bars["ns_b"] + (Xb * P if _element(b) else (Xb * P).sum())
            if learned["ns_c"]:
                AP = A @ P
                coeff_bars["ns_c"] = coeff_bars["ns_c"] + (Xb * AP if _element(c) else (Xb * AP).sum())
            A_bar = Q_bar @ P.mT + P_bar @ X.mT
            X_prev_bar = a * Xb + A @ P_bar
        else:
            AA = A @ A
            B_bar = Xb @ X.mT
            if learned["ns_b"]:
                coeff_bars["ns_b"] = coeff_bars["ns_b"] + (A * B_bar).sum()
            if learned["ns_c"]:
                coeff_bars["ns_c"] = coeff_bars["ns_c"] + (AA * B_bar).sum()
            A_bar = b * B_bar + c * (B_bar @ A + A @ B_bar)
            X_prev_bar = a * Xb + (b * A + c * AA) @ Xb
        Xb = X_prev_bar + (A_bar + A_bar.mT) @ X
    for name, value in coeff_bars.items():
        if learned[name]:
            add_bar(bars, hyper, name, _orient(value, transposed))

    # X_0 = X / N, N = max(|X|_F, eps)
    X, N, nu, nu_wins = f["X"], f["N"], f["nu"], f["nu_wins"]
    N_bar = (-Xb * X / (N * N)).sum_to_size(N.shape)
    zero = torch.zeros_like(N_bar)
    add_bar(bars, hyper, "eps", lambda: _orient(torch.where(nu_wins, zero, N_bar), transposed))
    X_bar = Xb / N
    nu_bar = torch.where(nu_wins, N_bar, zero).sum()  # 0 where eps wins (no branch on values: vmap)
    X_bar = X_bar + (nu_bar / torch.where(nu > 0, nu, torch.ones_like(nu))) * X
    u_bar = X_bar.mT if transposed else X_bar

    # u = G + mu (B' - G) (Nesterov) or B';  B' = B + (1 - mu)(G - B)
    buf, buf_next = state["momentum_buffer"], f["buf_next"]
    if hyper["nesterov"]:
        G_bar = (1 - mu) * u_bar
        buf_next_bar = mu * u_bar
        add_bar(bars, hyper, "momentum", lambda: (buf_next - G) * u_bar)
    else:
        G_bar = torch.zeros_like(u_bar)
        buf_next_bar = u_bar
    carried = state_next_bar.get("momentum_buffer")
    if carried is not None:
        buf_next_bar = buf_next_bar + carried
    G_bar = G_bar + (1 - mu) * buf_next_bar
    add_bar(bars, hyper, "momentum", lambda: -(G - buf) * buf_next_bar)
    state_bar: State = {"momentum_buffer": mu * buf_next_bar}
    return theta_bar, G_bar, state_bar, zero_missing_bars(bars, hyper, _HYPER)


def muon_step_jvp(
    theta: Tensor,
    G: Tensor,
    state: State,
    hyper: Hyper,
    theta_dot: Tensor,
    G_dot: Tensor,
    state_dot: State,
    hyper_dot: Mapping[str, Tensor],
) -> tuple[Tensor, State]:
    """Jacobian-vector product of :func:`muon_step`: the Newton–Schulz iteration differentiated
    forward, iterate by iterate, in the parameters' dtype (Note [Muon in the parameters' dtype]).

    .. math::
        \\dot B' &= \\mu \\dot B + (1 - \\mu) \\dot G + \\dot\\mu (B - G), \\quad
        \\dot u = (1 - \\mu) \\dot G + \\mu \\dot B' + \\dot\\mu (B' - G) \\text{ (Nesterov) or } \\dot B' \\\\
        \\dot\\nu &= \\langle X, \\dot X \\rangle / \\nu, \\quad
        \\dot N = [\\nu \\ge \\epsilon]\\, \\dot\\nu + [\\nu < \\epsilon]\\, \\dot\\epsilon, \\quad
        \\dot X_0 = (\\dot X - X_0 \\dot N) / N \\\\
        \\text{for } k &= 1..K, \\text{ with } X = X_{k-1}, A = X X^\\top, \\dot A = \\dot X X^\\top + X \\dot X^\\top: \\\\
        \\dot X_k &= \\dot a X + a \\dot X + (\\dot b A + b \\dot A + \\dot c A^2 + c (\\dot A A + A \\dot A)) X
        + (b A + c A^2) \\dot X \\\\
        \\dot\\theta' &= (1 - \\eta\\lambda) \\dot\\theta - (\\dot\\eta\\lambda + \\eta\\dot\\lambda) \\theta
        - \\dot\\eta s O - \\eta s \\dot O, \\quad \\dot O = \\dot X_K \\text{ (transposed back)}

    With per-element :math:`b, c` (Note [Per-element Newton–Schulz coefficients]), :math:`P = A X`,
    :math:`\\dot P = \\dot A X + A \\dot X` and
    :math:`\\dot X_k = \\dot a X + a \\dot X + \\dot b P + b \\dot P + \\dot c A P + c (\\dot A P + A \\dot P)`.
    The normalisation follows the branch of its clamp, as the VJP (Note [Muon's kinks]).
    """
    mu, e, lr_, wd = hyper["momentum"], hyper["eps"], hyper["lr"], hyper["weight_decay"]
    dot = {n: hyper_dot_of(hyper, hyper_dot, n) for n in _HYPER}
    buf = state["momentum_buffer"]
    buf_next = torch.lerp(buf, G, 1 - mu)
    buf_next_dot = add_dots((1 - mu) * G_dot, mul_dot(state_dot_of(state, state_dot, "momentum_buffer"), mu),
                            mul_dot(dot["momentum"], lambda: buf - G))
    assert buf_next_dot is not None
    if hyper["nesterov"]:
        update = torch.lerp(G, buf_next, mu)
        update_dot = add_dots((1 - mu) * G_dot, mu * buf_next_dot, mul_dot(dot["momentum"], lambda: buf_next - G))
        assert update_dot is not None
    else:
        update, update_dot = buf_next, buf_next_dot
    transposed = G.size(0) > G.size(1)
    a, b, c = (_orient(hyper[n], transposed) for n in ("ns_a", "ns_b", "ns_c"))
    a_dot, b_dot, c_dot = (None if dot[n] is None else _orient(dot[n], transposed) for n in ("ns_a", "ns_b", "ns_c"))
    expanded = _element(b) or _element(c)
    X, X_dot = (update.mT, update_dot.mT) if transposed else (update, update_dot)

    # X_0 = X / N, N = max(|X|_F, eps)
    nu = torch.linalg.vector_norm(X)
    e = _orient(e, transposed)
    e_dot = None if dot["eps"] is None else _orient(dot["eps"], transposed)
    nu_wins = nu >= e
    N = torch.where(nu_wins, nu, e)
    nu_dot = (X * X_dot).sum() / torch.where(nu > 0, nu, torch.ones_like(nu))
    N_dot = torch.where(nu_wins, nu_dot, 0.0 if e_dot is None else e_dot)
    Xk = X / N
    Xk_dot = (X_dot - Xk * N_dot) / N

    # the Newton-Schulz iterations, forward
    for _ in range(int(hyper["ns_steps"])):
        A = Xk @ Xk.mT
        A_dot = Xk_dot @ Xk.mT + Xk @ Xk_dot.mT
        if expanded:
            P = A @ Xk
            P_dot = A_dot @ Xk + A @ Xk_dot
            AP = A @ P
            nxt = a * Xk + b * P + c * AP
            nxt_dot = add_dots(a * Xk_dot + b * P_dot + c * (A_dot @ P + A @ P_dot), mul_dot(a_dot, Xk),
                               mul_dot(b_dot, P), mul_dot(c_dot, AP))
        else:
            AA = A @ A
            poly = b * A + c * AA
            poly_dot = add_dots(b * A_dot + c * (A_dot @ A + A @ A_dot), mul_dot(b_dot, A), mul_dot(c_dot, AA))
            assert poly_dot is not None
            nxt = a * Xk + poly @ Xk
            nxt_dot = add_dots(a * Xk_dot + poly_dot @ Xk + poly @ Xk_dot, mul_dot(a_dot, Xk))
        assert nxt_dot is not None
        Xk, Xk_dot = nxt, nxt_dot
    O, O_dot = (Xk.mT, Xk_dot.mT) if transposed else (Xk, Xk_dot)

    # theta' = theta (1 - lr wd) - lr s O
    ratio = lr_ratio(theta.shape, hyper["adjust_lr_fn"])
    theta_next_dot = add_dots(theta_dot * (1 - lr_ * wd), -(lr_ * ratio) * O_dot,
                              mul_dot(dot["lr"], lambda: -(wd * theta + ratio * O)),
                              mul_dot(dot["weight_decay"], lambda: -lr_ * theta))
    state_next_dot: State = {"momentum_buffer": dense_dot(buf_next_dot, buf_next)}
    for key, value in state.items():  # entries the step carries unchanged
        if key not in state_next_dot and isinstance(value, Tensor) and value.is_floating_point():
            state_next_dot[key] = dense_dot(state_dot_of(state, state_dot, key), value)
    return dense_dot(theta_next_dot, theta), state_next_dot


def check_matrix(name: str, param: Tensor) -> None:
    """Rejects a parameter that is not a matrix (Note [Muon's non-matrix parameters]).

    Raises:
        ValueError: ``param`` does not have exactly two dimensions.
    """
    if param.dim() != 2:
        raise ValueError(
            f"Muon only takes 2-D parameters, but parameter {name!r} has shape {tuple(param.shape)}. "
            "Leave biases, norms, embeddings and other non-matrix parameters out of the Muon optimizer "
            "(torch.optim.Muon rejects them too): GimliUpdater then keeps them fixed in the inner loop (learn them "
            "as meta-parameters with learn_init=True), or in training use a second optimizer for the rest, "
            "or Adam/AdamW for everything"
        )


MUON = DiffOptimizer(
    name="Muon",
    torch_cls=torch.optim.Muon,
    step=muon_step,
    step_vjp=muon_step_vjp,
    step_jvp=muon_step_jvp,
    hyper=(
        lr(),
        weight_decay(),
        unit_interval("momentum", doc="the momentum of the buffer (the lerp weight is 1 - momentum)"),
        eps(),
        Hyperparameter("ns_a", option="ns_coefficients", index=0, low=None,
                       doc="Newton-Schulz coefficient a (of X)"),
        Hyperparameter("ns_b", option="ns_coefficients", index=1, low=None,
                       doc="Newton-Schulz coefficient b (of X X^T X)"),
        Hyperparameter("ns_c", option="ns_coefficients", index=2, low=None,
                       doc="Newton-Schulz coefficient c (of (X X^T)^2 X)"),
    ),
    flags=(
        Flag("nesterov", default=True, why="it switches between two update rules"),
        Flag("ns_steps", default=5, kind=int, why="the number of Newton-Schulz iterations is an integer"),
        Flag("adjust_lr_fn", default=None, kind=LrAdjustment,
             why="it picks the shape-dependent factor of the learning rate"),
    ),
    state=(StateEntry("momentum_buffer"),),
    elementwise=False,
    check_param=check_matrix,
    notes="Newton-Schulz in the parameters' dtype, not bfloat16 (Note [Muon in the parameters' dtype]); "
          "the Frobenius normalisation takes the branch of its clamp (Note [Muon's kinks]).",
)

__all__ = ["LrAdjustment", "MUON", "check_matrix", "lr_ratio", "muon_step", "muon_step_jvp", "muon_step_vjp"]
