# SPDX-License-Identifier: Apache-2.0
"""``compile=True`` (gimli_bptt/compiled.py): the compiled meta-steps give eager gimli's hypergradients, on
every optimizer class, in both compiled forms (the whole meta step as one graph, and one graph per step),
with every option the eager updater takes; they fall back to eager with one warning, report their compile
time, keep the memory plans bit-identical, and leave everything unchanged when a step fails.

Compiling takes seconds per function on a CPU: the models are tiny, and the checks that compile most
(every optimizer class, long unrolls) are marked slow.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater, Memory
from gimli_bptt.compiled import WHOLE_MAX_UNROLL
from gimli_bptt.errors import NonFiniteError
from gimli_bptt.testing import float64_rtol, relative_error

from optim_table import ROWS, Row, row
from problems import build_model, ce_loss, make_batches

#: A compiled function that falls back to eager would make any comparison here moot: its warning fails the
#: test (the fallback's own test records it instead).
pytestmark = pytest.mark.filterwarnings("error:compile=True:RuntimeWarning")

# Compiled and eager gimli compute the same float64 numbers in other orders (inductor fuses and
# reassociates the element-wise arithmetic and the reductions of each step). On these problems (J <= 6
# steps of tiny nets) the hypergradients grow a rounding difference by at most 1e2 (measured with
# gimli_bptt.testing.hypergradient_amplification: 4-60x for the rows below), bounded by 1e3; every
# value is compared relative to the largest hypergradient of its problem, since a hypergradient that is
# zero in exact arithmetic (a bias before BatchNorm) is round-off on both sides.
RTOL = float64_rtol(terms=1, condition=1e3)

#: One row per optimizer class of the table (the first of each).
CLASS_ROWS = list({r.torch_cls: r for r in reversed(ROWS)}.values())


def _updater(r: Row, compile: bool, *, arch: str = "mlp", unroll: int = 2, learn: Optional[dict[str, str]] = None,
             **options: Any) -> GimliUpdater:
    model = build_model(arch, seed=0)
    opt = r.for_model(model)
    learn = {n: "group" for n in r.fd_names()} if learn is None else learn
    return GimliUpdater(model, opt, options.pop("train_loss", ce_loss), ce_loss, unroll=unroll, learn=learn,
                        compile=compile, **options)


def _assert_same(eager: dict[str, Tensor], compiled: dict[str, Tensor], tol: float = RTOL) -> None:
    assert eager.keys() == compiled.keys()
    scale = max(float(v.abs().max()) for v in eager.values())
    for name, value in eager.items():
        err = relative_error(compiled[name], value, floor=scale)
        assert err <= tol, f"{name}: compiled differs from eager by {err:.3g} (relative to {scale:.3g})"


def _pair(r: Row, batches: Any, val: Any, **options: Any) -> tuple[Any, Any, GimliUpdater]:
    """Eager and compiled hypergradients of the same problem, and the compiled updater."""
    eager = _updater(r, False, **options).hypergradient(batches, val)
    updater = _updater(r, True, **options)
    return eager, updater.hypergradient(batches, val), updater


# --------------------------------------------------------------------------- every optimizer class
@pytest.mark.slow
@pytest.mark.parametrize("r", CLASS_ROWS, ids=lambda r: r.id)
def test_every_optimizer_class_whole_meta_step(r: Row, float64_default: None) -> None:
    """Every learnable hyperparameter of each class, in two param groups, with θ_0 learned too."""
    batches, val = make_batches(2, seed=1)
    eager, compiled, updater = _pair(r, batches, val, learn_init=True)
    assert updater.last_tape_stats is not None and updater.last_tape_stats.schedule == "whole"
    _assert_same(eager.hypergrads, compiled.hypergrads)
    assert torch.allclose(compiled.val_loss, eager.val_loss, rtol=RTOL, atol=0)


@pytest.mark.parametrize("rid", ["sgd-momentum", "adam-lr", "nadam-default", "rmsprop-centered"])
def test_one_graph_per_step(rid: str, float64_default: None) -> None:
    """The step-by-step form (memory=None never runs the whole meta step), on rows whose state has a momentum
    buffer or a step count (Adam's bias corrections, NAdam's momentum schedule: as a 0-d tensor)."""
    batches, val = make_batches(3, seed=2)
    eager, compiled, updater = _pair(row(rid), batches, val, unroll=3, memory=None)
    assert updater.last_tape_stats is not None and updater.last_tape_stats.schedule == "full"
    _assert_same(eager.hypergrads, compiled.hypergrads)
    assert torch.equal(compiled.train_losses, eager.train_losses) or torch.allclose(
        compiled.train_losses, eager.train_losses, rtol=RTOL, atol=0)


# --------------------------------------------------------------------------- the options
@pytest.mark.parametrize("memory", ["auto", None], ids=["whole", "steps"])
def test_models_with_buffers_and_dropout(memory: Optional[str], float64_default: None) -> None:
    """BatchNorm's running statistics evolve as eagerly; dropout draws the forward pass's masks in the
    reverse step (recomputed: memory=None) or keeps them (the whole meta step)."""
    for arch in ("mlp_bn_dropout",):
        batches, val = make_batches(3, seed=3)
        results = []
        for compile in (False, True):
            torch.manual_seed(7)
            u = _updater(row("sgd-momentum"), compile, arch=arch, unroll=3, learn={"lr": "tensor"}, learn_init=True,
                         memory=memory, commit=False)
            results.append(u.hypergradient(batches, val))
        _assert_same(results[0].hypergrads, results[1].hypergrads)


@pytest.mark.parametrize("memory", ["auto", None], ids=["whole", "steps"])
def test_tasks_lr_schedule_and_truncation(memory: Optional[str], float64_default: None) -> None:
    """A meta-batch of tasks (vmap inside the compiled graphs), a warm-up schedule and a truncated window."""
    T, J = 3, 4
    batches = [tuple(torch.randn(T, 8, 1, 6, 6, generator=torch.Generator().manual_seed(10 * j + k))
                     if k == 0 else torch.randint(0, 3, (T, 8), generator=torch.Generator().manual_seed(j))
                     for k in range(2)) for j in range(J)]
    val = (torch.randn(T, 8, 1, 6, 6), torch.randint(0, 3, (T, 8)))
    options = dict(unroll=J, tasks=T, learn={"lr": "tensor", "momentum": "group"}, learn_init=True,
                   lr_schedule=lambda j: min(1.0, (j + 1) / 3), memory=memory)
    eager, compiled, _ = _pair(row("sgd-momentum"), batches, val, **options)
    _assert_same(eager.hypergrads, compiled.hypergrads)
    assert compiled.task_val_losses is not None and compiled.task_val_losses.shape == (T,)
    options.update(learn_init=False, truncate=2)
    eager, compiled, _ = _pair(row("sgd-momentum"), batches, val, **options)
    _assert_same(eager.hypergrads, compiled.hypergrads)


@pytest.mark.parametrize("memory", ["auto", None], ids=["whole", "steps"])
def test_first_order(memory: Optional[str], float64_default: None) -> None:
    batches, val = make_batches(3, seed=4)
    eager, compiled, _ = _pair(row("adam-lr"), batches, val, unroll=3, learn={"lr": "tensor"}, first_order=True,
                               memory=memory)
    _assert_same(eager.hypergrads, compiled.hypergrads)


def test_loss_parameters(float64_default: None) -> None:
    """Loss parameters the loss closes over: their mixed term is autograd's through the compiled graph of
    ⟨G_j, Ḡ_j⟩, so the meta step runs step by step."""
    def make(compile: bool) -> GimliUpdater:
        model = build_model("mlp", seed=0)
        n = len(list(model.parameters()))
        scale = torch.tensor(1.0, requires_grad=True)
        l2 = torch.full((n,), 1e-2, requires_grad=True)

        def train_loss(m: Any, batch: Any) -> Tensor:
            return scale * ce_loss(m, batch) + sum(c * (p**2).sum() for c, p in zip(l2, m.parameters()))

        return GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), train_loss, ce_loss,
                            unroll=3, learn={"lr": "group"}, loss_params={"scale": scale, "l2": l2}, compile=compile)

    batches, val = make_batches(3, seed=5)
    eager = make(False).hypergradient(batches, val)
    updater = make(True)
    compiled = updater.hypergradient(batches, val)
    assert updater.last_tape_stats is not None and updater.last_tape_stats.schedule != "whole"
    _assert_same(eager.hypergrads, compiled.hypergrads)


def test_memory_plans_are_bit_identical(float64_default: None) -> None:
    """Within compiled mode, every plan recomputes with the same compiled graphs: the same bits, with
    dropout replaying its masks."""
    batches, val = make_batches(6, seed=6)
    results = []
    for memory in (None, Memory(slots=2), Memory(every=3)):
        torch.manual_seed(8)
        u = _updater(row("adam-lr"), True, arch="dropout", unroll=6, learn={"lr": "tensor", "beta1": "group"},
                     memory=memory)
        results.append(u.hypergradient(batches, val))
        assert u.last_tape_stats is not None
    assert results[1].hypergrads.keys() == results[0].hypergrads.keys()
    for other in results[1:]:
        for name, value in results[0].hypergrads.items():
            assert torch.equal(other.hypergrads[name], value), name


# --------------------------------------------------------------------------- reporting, failures, errors
def test_compile_time_is_reported_and_announced(capsys: pytest.CaptureFixture[str], float64_default: None) -> None:
    batches, val = make_batches(2, seed=7)
    updater = _updater(row("sgd-momentum"), True, learn={"lr": "group"})
    updater.hypergradient(batches, val)
    stats = updater.last_tape_stats
    assert stats is not None and stats.compile_seconds is not None and stats.compile_seconds > 0
    assert "compiling the meta-step functions" in capsys.readouterr().err
    updater.hypergradient(batches, val)  # the same shapes: nothing left to compile
    assert updater.last_tape_stats is not None and updater.last_tape_stats.compile_seconds == 0.0
    eager = _updater(row("sgd-momentum"), False, learn={"lr": "group"})
    eager.hypergradient(batches, val)
    assert eager.last_tape_stats is not None and eager.last_tape_stats.compile_seconds is None


class _GraphBreak(nn.Module):
    """A model whose forward pass reads a tensor's value in Python: a graph break."""

    def __init__(self) -> None:
        super().__init__()
        self.body = build_model("mlp", seed=0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out * 2.0 if float(out.sum()) > 1e9 else out


def test_graph_break_falls_back_with_one_warning(float64_default: None) -> None:
    batches, val = make_batches(2, seed=8)
    results = []
    for compile in (False, True):
        model = _GraphBreak()
        u = GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, unroll=2,
                         learn={"lr": "group"}, compile=compile)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(u.hypergradient(batches, val))
            u.hypergradient(batches, val)  # no second warning
        fallbacks = [w for w in caught if "could not be compiled" in str(w.message)]
        if compile:
            assert fallbacks and len({str(w.message) for w in fallbacks}) == len(fallbacks), fallbacks
            assert all(w.category is RuntimeWarning for w in fallbacks)
            assert "whole" in u.compiled.eager and "inner" in u.compiled.eager  # type: ignore[union-attr]
        else:
            assert not fallbacks
    _assert_same(results[0].hypergrads, results[1].hypergrads, tol=0.0)


def test_failed_step_changes_nothing(float64_default: None) -> None:
    batches, val = make_batches(2, seed=9)
    bad = [batches[0], (torch.full_like(batches[1][0], float("nan")), batches[1][1])]
    updater = _updater(row("adam-lr"), True, learn={"lr": "group"}, learn_init=True)
    updater.step(batches, val)  # compiles
    model = copy.deepcopy(updater.model.state_dict())
    phi = [t.detach().clone() for t in updater.meta_parameters()]
    opt_state = copy.deepcopy(updater.opt.state_dict())
    with pytest.raises(NonFiniteError, match="inner step 1"):
        updater.step(bad, val)
    for name, value in updater.model.state_dict().items():
        assert torch.equal(value, model[name]), name
    assert all(torch.equal(a, b) for a, b in zip(updater.meta_parameters(), phi))
    assert str(updater.opt.state_dict()) == str(opt_state)


@pytest.mark.parametrize("options, match", [
    (dict(hvp="fwd"), "hvp='rev'"),
    (dict(mode="forward", learn={"lr": "group"}), "mode='forward'"),
    (dict(kernels="fused"), "kernels='fused'"),
    (dict(memory=Memory(keep_graphs=True)), "keep_graphs"),
])
def test_options_that_cannot_be_compiled(options: dict[str, Any], match: str) -> None:
    model = build_model("mlp")
    with pytest.raises(ValueError, match=match):
        GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss,
                     **{"learn": {"lr": "group"}, **options}, compile=True)


def test_compile_must_be_a_bool() -> None:
    model = build_model("mlp")
    with pytest.raises(TypeError, match="compile must be True or False"):
        GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, ce_loss, learn={"lr": "group"},
                     compile="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- compile time flat in J
def _graphs_compiled(run: Callable[[], Any]) -> int:
    before = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    run()
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - before


@pytest.mark.slow
def test_graphs_compiled_do_not_grow_with_the_unroll(float64_default: None) -> None:
    """Step by step, a longer unroll compiles the same graphs: the compile time is flat in J."""
    counts = []
    for J in (WHOLE_MAX_UNROLL + 2, 4 * WHOLE_MAX_UNROLL):
        batches, val = make_batches(J, seed=10)
        updater = _updater(row("adam-lr"), True, unroll=J, learn={"lr": "group"})
        counts.append(_graphs_compiled(lambda: updater.hypergradient(batches, val)))
        assert updater.last_tape_stats is not None and updater.last_tape_stats.schedule == "full"
        assert _graphs_compiled(lambda: updater.hypergradient(batches, val)) == 0
    assert counts[0] == counts[1] > 0, counts


def test_new_shapes_compile_again_and_agree(float64_default: None) -> None:
    updater = _updater(row("sgd-momentum"), True, learn={"lr": "group"})
    eager = _updater(row("sgd-momentum"), False, learn={"lr": "group"})
    for n in (8, 5):
        batches, val = make_batches(2, n=n, seed=11)
        _assert_same(eager.hypergradient(batches, val).hypergrads, updater.hypergradient(batches, val).hypergrads)


def test_mse_regression_whole_and_steps_agree(float64_default: None) -> None:
    """The two compiled forms of one problem: one graph for the meta step, one per step."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 10, 1), torch.randn(4, 10, 1)
    results = []
    for memory in ("auto", None):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).double()
        mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
        u = GimliUpdater(model, torch.optim.SGD(model.parameters(), lr=0.05), mse, mse, unroll=3,
                         learn={"lr": "tensor"}, learn_init=True, memory=memory, compile=True)
        results.append(u.hypergradient([(x[j], y[j]) for j in range(3)], (x[3], y[3])))
    _assert_same(results[0].hypergrads, results[1].hypergrads)


def test_rprop_steps_run_eagerly_and_its_whole_meta_step_compiles(float64_default: None) -> None:
    """Rprop branches on its step count in Python: step by step it runs eagerly, with one warning; its
    whole meta step, where the counts are constants of the graph, compiles."""
    batches, val = make_batches(3, seed=13)
    r = row("rprop-default")
    eager = _updater(r, False, unroll=3).hypergradient(batches, val)
    updater = _updater(r, True, unroll=3, memory=None)
    with pytest.warns(RuntimeWarning, match="step function runs eagerly: Rprop reads its step count"):
        stepwise = updater.hypergradient(batches, val)
    assert updater.compiled is not None and set(updater.compiled.eager) == {"inner", "reverse"}
    _assert_same(eager.hypergrads, stepwise.hypergrads)  # the validation gradient is still compiled
    whole = _updater(r, True, unroll=3)
    _assert_same(eager.hypergrads, whole.hypergradient(batches, val).hypergrads)
    assert whole.last_tape_stats is not None and whole.last_tape_stats.schedule == "whole"


def test_optimizer_stepping_per_task(float64_default: None) -> None:
    """Muon is not element-wise: with tasks it steps each task under vmap, inside the compiled graphs, in
    both compiled forms."""
    T, J = 2, 2
    gen = torch.Generator().manual_seed(12)
    batches = [(torch.randn(T, 8, 1, 6, 6, generator=gen), torch.randint(0, 3, (T, 8), generator=gen))
               for _ in range(J)]
    val = (torch.randn(T, 8, 1, 6, 6, generator=gen), torch.randint(0, 3, (T, 8), generator=gen))
    r = row("muon-default")
    eager = _updater(r, False, unroll=J, tasks=T, learn={"lr": "group"}).hypergradient(batches, val)
    for memory in ("auto", None):
        updater = _updater(r, True, unroll=J, tasks=T, learn={"lr": "group"}, memory=memory)
        _assert_same(eager.hypergrads, updater.hypergradient(batches, val).hypergrads)


class _UnusedHead(nn.Module):
    """A parameter the loss never reads: torch.optim skips it (its .grad stays None), weight decay included."""

    def __init__(self) -> None:
        super().__init__()
        self.body = build_model("mlp", seed=0)
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_parameters_the_loss_does_not_use_stay_as_they_are(float64_default: None) -> None:
    batches, val = make_batches(2, seed=14)
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = _UnusedHead()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        u = GimliUpdater(model, opt, ce_loss, ce_loss, unroll=2, learn={"lr": "tensor"}, commit=True, compile=compile)
        results.append((u.step(batches, val), [p.detach().clone() for p in model.unused.parameters()]))
    _assert_same(results[0][0].hypergrads, results[1][0].hypergrads)
    for eager_p, compiled_p in zip(results[0][1], results[1][1]):
        assert torch.equal(eager_p, compiled_p)
