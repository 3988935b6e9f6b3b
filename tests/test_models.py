# SPDX-License-Identifier: Apache-2.0
"""Real models out of the box: every torchvision classification model and torch.nn's attention,
recurrent, embedding, normalisation and dropout layers, each exact against a full autograd unroll
(float64, J=2, a few parameter groups) or failing with a gimli error that names the fix."""
from __future__ import annotations

import gc
import os
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.second_order import MissingDoubleBackwardError
from gimli_bptt.testing import check_hypergradients

D = torch.float64
TOL = 1e-9
CLASSES = 3
J = 2

try:  # torchvision from the registry imports only beside the torch it was built for
    import torchvision

    TV_MODELS: list[str] = torchvision.models.list_models(module=torchvision.models)
    TV_SKIP: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - absent, or built for another torch
    TV_MODELS, TV_SKIP = [], f"torchvision is not importable here ({type(exc).__name__}: {str(exc)[:120]})"


# --------------------------------------------------------------------------- the harness
def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """Three parameter groups: the first tensor (the stem), one from the middle, the last two (the head).

    The other parameters stay outside the optimizer (the torchvision models also set them
    ``requires_grad=False``), so memory follows these tensors, not the model; the gradient of the
    stem still flows back through every layer, so every op's double backward is exercised by the
    Hessian-vector products.
    """
    params = list(model.parameters())
    mid = len(params) // 2
    picked = [[params[0]], [params[mid]], params[-2:]]
    seen: set[int] = set()
    groups = []
    for group in picked:
        group = [p for p in group if id(p) not in seen]
        seen.update(id(p) for p in group)
        if group:
            groups.append({"params": group})
    return groups


def _logits_loss(model: Any, batch: Any) -> Tensor:
    """Cross-entropy of the logits, plus 0.3 of each auxiliary head's (GoogLeNet, Inception)."""
    x, y = batch
    out = model(x)
    if isinstance(out, tuple):  # GoogLeNetOutputs, InceptionOutputs: (logits, aux...)
        main, *aux = [o for o in out if o is not None]
        return F.cross_entropy(main, y) + 0.3 * sum((F.cross_entropy(a, y) for a in aux), torch.zeros((), dtype=D))
    return F.cross_entropy(out, y)


def _check(model: nn.Module, make_batch: Callable[[torch.Generator], Any], loss: Callable[[Any, Any], Tensor],
           groups: Optional[list[dict[str, Any]]] = None, optimizer: str = "sgd", **options: Any) -> dict[str, float]:
    """check_hypergradients of per-group learning rates over J=2 steps, on the model as it is (float64)."""
    g = torch.Generator().manual_seed(1)
    batches, val = [make_batch(g) for _ in range(J)], make_batch(g)
    groups = groups if groups is not None else _groups(model)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(groups, lr=1e-3)
    updater = GimliUpdater(model, opt, loss, loss, unroll=J, learn={"lr": "group"}, **options)
    torch.manual_seed(2)
    return check_hypergradients(updater, batches, val)


def _assert_exact(errors: dict[str, float]) -> None:
    assert max(errors.values()) <= TOL, errors


# --------------------------------------------------------------------------- torchvision
#: The smallest square input (batch of 2) each model accepts, measured with torchvision 0.29.1
#: (others: probed among PROBE_SIZES). Inception-v3 runs without its auxiliary head, which alone
#: needs 299x299 (the rest of the network runs at 75x75); MaxViT's partition size 7 needs 224x224.
#: Deep models whose last stages run on 1x1 maps at 8x8 (each BatchNorm normalising 4 values) are
#: ill-conditioned there: rounding grows through their blocks to a relative error of 1e-10 to 1e-7,
#: which varies with the CPU and the threads' reduction order (RegNet Y 1.6GF: 6e-10 here, 2.5e-9 on
#: CI's machine; ResNeXt-101 32x8d 1e-8; ResNet-152 1e-7 at 16x16). Each of them takes the smallest
#: input among 8, 16 and 32 whose error here is below 1e-11, 100x under TOL (torch 2.14.1,
#: torchvision 0.29.1, measured for every model at 8 and then at 16 and 32: at 32x32 every one of
#: them is below 1e-12).
TV_INPUT = {
    "alexnet": 64, "googlenet": 16, "inception_v3": 75, "maxvit_t": 224, "squeezenet1_0": 24, "squeezenet1_1": 24,
    **{n: 16 for n in ("efficientnet_b5", "mnasnet1_3", "regnet_x_400mf", "regnet_x_1_6gf", "regnet_x_3_2gf",
                       "regnet_x_8gf", "regnet_x_16gf", "regnet_x_32gf", "regnet_y_3_2gf", "regnet_y_8gf",
                       "regnet_y_16gf", "regnet_y_32gf")},
    **{n: 32 for n in ("regnet_y_1_6gf", "resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d",
                       "wide_resnet101_2")},
    **{n: 32 for n in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "densenet121",
                       "densenet161", "densenet169", "densenet201", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
                       "vgg16_bn", "vgg19", "vgg19_bn")},
}
#: Images per batch. Not 2: BatchNorm in training mode over two values per channel (the last stage's 1x1
#: maps) outputs exactly -1 and 1 whatever its input, so the hypergradients of every layer below it are zero up
#: to rounding and no comparison of them is meaningful.
TV_BATCH = 4
#: Models whose smallest maps are large enough for BatchNorm with two images (MaxViT's last are 7x7), at half the cost.
TV_BATCH_OF = {"maxvit_t": 2}
PROBE_SIZES = (8, 16, 24, 32, 48, 64, 75, 96, 112, 128, 160, 224, 299)

#: Models whose hypergradients take more than a few seconds here (CI runs them; -m "not slow" skips them).
TV_QUICK = {"mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "shufflenet_v2_x0_5", "squeezenet1_1",
            "mnasnet0_5", "efficientnet_b0", "regnet_y_400mf", "vit_b_16", "swin_t"}

#: Models too large to check on a 2-core, 24 GiB machine in float64 (hundreds of millions of parameters, or
#: MaxViT's 224x224 input: more than 12 GB at four images): not run, and not claimed exact.
TV_TOO_LARGE = {"convnext_large": "198M parameters", "regnet_y_128gf": "645M parameters", "vit_h_14": "632M parameters",
                "vit_l_16": "304M parameters", "vit_l_32": "306M parameters",
                "maxvit_t": "224x224 inputs: more than 12 GB in float64 at four images"}

#: Models that fail by design, with the op whose missing double backward the gimli error names.
TV_EXPECTED_ERRORS: dict[str, str] = {}


def _tv_kwargs(name: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"weights": None, "num_classes": CLASSES}
    if name.startswith("vit_"):
        kwargs["image_size"] = int(name.rsplit("_", 1)[1])  # one patch (plus the class token)
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # torchvision's own initialisation, without its future-change warning
    if name == "inception_v3":
        kwargs["aux_logits"] = False
    return kwargs


def _tv_model(name: str) -> tuple[nn.Module, int]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)  # built in float64: no float32 copy of the largest models
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = torchvision.models.get_model(name, **_tv_kwargs(name))
    finally:
        torch.set_default_dtype(old)
    model = model.double().train()
    size = TV_INPUT.get(name, 8 if not name.startswith("vit_") else int(name.rsplit("_", 1)[1]))
    if name not in TV_INPUT and not name.startswith("vit_"):
        size = _smallest_input(model)
    return model, size


def _smallest_input(model: nn.Module) -> int:
    for s in PROBE_SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(2, 3, s, s, dtype=D))
            return s
        except (RuntimeError, ValueError, AssertionError):
            continue
    raise AssertionError(f"no input size among {PROBE_SIZES} fits {type(model).__name__}")


#: Set by CI's torch 2.14.1 environment, where the matrix must run: a torchvision that does not import fails there.
TV_REQUIRED = os.environ.get("GIMLI_REQUIRE_TORCHVISION", "") not in ("", "0")


def _tv_params() -> list[Any]:
    if TV_SKIP is not None:
        if TV_REQUIRED:
            return [pytest.param(None, id="torchvision")]  # the test fails with TV_SKIP's reason
        return [pytest.param(None, marks=pytest.mark.skip(reason=TV_SKIP), id="torchvision")]
    def marks(n: str) -> Any:
        if n in TV_TOO_LARGE:
            return pytest.mark.skip(reason=f"{n} is too large to check here in float64 ({TV_TOO_LARGE[n]})")
        return () if n in TV_QUICK else pytest.mark.slow

    return [pytest.param(n, id=n, marks=marks(n)) for n in TV_MODELS]


@pytest.mark.parametrize("name", _tv_params())
def test_torchvision_model(name: Optional[str]) -> None:
    if name is None:
        pytest.fail(f"GIMLI_REQUIRE_TORCHVISION is set but {TV_SKIP}")
    model, size = _tv_model(name)
    n = TV_BATCH_OF.get(name, TV_BATCH)

    def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(n, 3, size, size, dtype=D, generator=g), torch.randint(0, CLASSES, (n,), generator=g)

    groups = _groups(model)
    learned = {id(p) for group in groups for p in group["params"]}
    for p in model.parameters():  # frozen: half the work of each backward pass, the same hypergradients
        if id(p) not in learned:
            p.requires_grad_(False)
    try:
        if name in TV_EXPECTED_ERRORS:
            with pytest.raises(MissingDoubleBackwardError) as info:
                _check(model, batch, _logits_loss, groups)
            assert info.value.op == TV_EXPECTED_ERRORS[name] and info.value.module_path is not None
            assert "Fix:" in str(info.value)
        else:
            _assert_exact(_check(model, batch, _logits_loss, groups))
    finally:
        del model
        gc.collect()


class RoIPool(nn.Module):
    """torchvision's roi_align over one box per image (its op has no double backward)."""

    def forward(self, x: Tensor) -> Tensor:
        boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]], dtype=x.dtype)] * x.shape[0]
        return torchvision.ops.roi_align(x, boxes, 2)


def test_a_torchvision_op_without_double_backward_is_named() -> None:
    if TV_SKIP is not None:
        (pytest.fail if TV_REQUIRED else pytest.skip)(TV_SKIP)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), RoIPool(), nn.Flatten(), nn.Linear(8, CLASSES)).double()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[3].parameters())}]
    with pytest.raises(MissingDoubleBackwardError) as info:
        _check(model, _seq_batch((2, 1, 6, 6)), _logits_loss, groups)
    assert (info.value.op, info.value.forward_op, info.value.module_path) == ("_roi_align_backward", "roi_align", "1")
    message = str(info.value)
    assert "torchvision::roi_align" in message and "register_equivalent(torch.ops.torchvision.roi_align" in message


def test_torchvision_lists_classification_models() -> None:
    if TV_SKIP is not None:
        (pytest.fail if TV_REQUIRED else pytest.skip)(TV_SKIP)
    assert {"mobilenet_v3_small", "vit_b_16", "resnet18"} <= set(TV_MODELS)
    assert not set(TV_INPUT) - set(TV_MODELS), "an entry of TV_INPUT names no model"


# --------------------------------------------------------------------------- attention
def _seq_batch(shape: tuple[int, ...], dtype: torch.dtype = D) -> Callable[[torch.Generator], Any]:
    def make(g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randn(*shape, dtype=dtype, generator=g), torch.randint(0, CLASSES, (shape[0],), generator=g)
    return make


class Classify(nn.Module):
    """A sequence model followed by a mean over positions and a linear head."""

    def __init__(self, body: nn.Module, width: int, batch_first: bool = True,
                 call: Optional[Callable[[nn.Module, Tensor], Tensor]] = None) -> None:
        super().__init__()
        self.body, self.head, self.batch_first, self.call = body, nn.Linear(width, CLASSES), batch_first, call

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.call(self.body, x) if self.call is not None else self.body(x)
        if isinstance(h, tuple):
            h = h[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


L, E = 5, 8
_causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
_padding = torch.tensor([[False] * L, [False] * (L - 2) + [True] * 2, [False] * L, [False, True] + [False] * (L - 2)])


def _encoder(batch_first: bool = True, **layer: Any) -> nn.Module:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, 16, batch_first=batch_first, **layer), 2,
                                 enable_nested_tensor=False)


ATTENTION: dict[str, Callable[[], nn.Module]] = {
    "encoder": lambda: Classify(_encoder(), E),
    "encoder, seq first": lambda: Classify(_encoder(batch_first=False), E, batch_first=False),
    "encoder, causal mask": lambda: Classify(_encoder(), E, call=lambda m, x: m(x, mask=_causal, is_causal=True)),
    "encoder, padding mask": lambda: Classify(_encoder(), E, call=lambda m, x: m(x, src_key_padding_mask=_padding)),
    "encoder, norm first, gelu": lambda: Classify(_encoder(norm_first=True, activation="gelu"), E),
    "decoder, causal": lambda: Classify(
        nn.TransformerDecoder(nn.TransformerDecoderLayer(E, 2, 16, batch_first=True), 2), E,
        call=lambda m, x: m(x, x.flip(1), tgt_mask=_causal, tgt_is_causal=True, memory_key_padding_mask=_padding)),
    "transformer": lambda: Classify(nn.Transformer(E, 2, 1, 1, 16, batch_first=True), E,
                                    call=lambda m, x: m(x, x[:, :3], tgt_mask=_causal[:3, :3])),
    "mha": lambda: Classify(nn.MultiheadAttention(E, 2, batch_first=True), E,
                            call=lambda m, x: m(x, x, x, need_weights=False)),
    "mha, weights": lambda: Classify(nn.MultiheadAttention(E, 2, batch_first=True), E,
                                     call=lambda m, x: m(x, x, x, need_weights=True)),
    "mha, per-head weights, float mask": lambda: Classify(
        nn.MultiheadAttention(E, 2, batch_first=True), E,
        call=lambda m, x: m(x, x, x, attn_mask=torch.zeros(L, L, dtype=D).masked_fill(_causal, -1e9),
                            need_weights=True, average_attn_weights=False)),
    "mha, padding and causal masks": lambda: Classify(
        nn.MultiheadAttention(E, 2, batch_first=True), E,
        call=lambda m, x: m(x, x, x, key_padding_mask=_padding, attn_mask=_causal, need_weights=False)),
    "mha, seq first, kdim/vdim, bias_kv, zero_attn": lambda: Classify(
        nn.MultiheadAttention(E, 2, kdim=6, vdim=4, add_bias_kv=True, add_zero_attn=True, dropout=0.2), E,
        batch_first=False, call=lambda m, x: m(x, x[..., :6], x[..., 2:6], need_weights=False)),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention(case: str) -> None:
    torch.manual_seed(0)
    model = ATTENTION[case]().double().train()
    groups = [{"params": list(model.body.parameters())}, {"params": list(model.head.parameters())}]
    _assert_exact(_check(model, _seq_batch((4, L, E)), _logits_loss, groups))


def test_attention_in_forward_over_reverse_mode() -> None:
    torch.manual_seed(0)
    model = ATTENTION["encoder, padding mask"]().double().train()
    groups = [{"params": list(model.body.parameters())}, {"params": list(model.head.parameters())}]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="hvp='fwd'")  # no fallback to the reverse mode
        _assert_exact(_check(model, _seq_batch((4, L, E)), _logits_loss, groups, optimizer="adam", hvp="fwd"))


# --------------------------------------------------------------------------- recurrent
RNNS: dict[str, Callable[[], nn.Module]] = {
    "lstm, 2 layers, bidirectional": lambda: nn.LSTM(E, 4, num_layers=2, bidirectional=True, batch_first=True),
    "lstm, proj_size, dropout": lambda: nn.LSTM(E, 6, num_layers=2, proj_size=4, dropout=0.3, batch_first=True),
    "gru, 2 layers, bidirectional": lambda: nn.GRU(E, 4, num_layers=2, bidirectional=True, batch_first=True),
    "gru, seq first": lambda: nn.GRU(E, 4),
    "rnn tanh, 2 layers, bidirectional": lambda: nn.RNN(E, 4, num_layers=2, bidirectional=True, batch_first=True),
    "rnn relu": lambda: nn.RNN(E, 4, nonlinearity="relu", batch_first=True),
    "lstm cell": lambda: nn.LSTMCell(E, 4),
    "gru cell": lambda: nn.GRUCell(E, 4),
}


def _width(rnn: nn.Module) -> int:
    if isinstance(rnn, (nn.LSTMCell, nn.GRUCell)):
        return rnn.hidden_size
    size = getattr(rnn, "proj_size", 0) or rnn.hidden_size
    return size * (2 if rnn.bidirectional else 1)


def _cell_loop(cell: nn.Module, x: Tensor) -> Tensor:
    state: Any = None
    outs = []
    for t in range(x.shape[1]):
        state = cell(x[:, t], state)
        outs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("case", list(RNNS))
def test_recurrent(case: str) -> None:
    torch.manual_seed(0)
    rnn = RNNS[case]()
    cell = isinstance(rnn, (nn.LSTMCell, nn.GRUCell))
    batch_first = cell or rnn.batch_first
    model = Classify(rnn, _width(rnn), batch_first=batch_first, call=_cell_loop if cell else None).double().train()
    params = list(rnn.parameters())
    groups = [{"params": params[: len(params) // 2]}, {"params": params[len(params) // 2:]},
              {"params": list(model.head.parameters())}]
    _assert_exact(_check(model, _seq_batch((4, L, E)), _logits_loss, groups))


class PackedLSTM(nn.Module):
    """A bidirectional LSTM over padded sequences of different lengths, classified from its last states."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(E, 4, batch_first=True, bidirectional=True)
        self.head = nn.Linear(8, CLASSES)
        self.lengths = torch.tensor([5, 3, 4, 2])

    def forward(self, x: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, self.lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(torch.cat([h[0], h[1]], 1))


def test_packed_sequences() -> None:
    torch.manual_seed(0)
    model = PackedLSTM().double()
    groups = [{"params": list(model.lstm.parameters())}, {"params": list(model.head.parameters())}]
    _assert_exact(_check(model, _seq_batch((4, L, E)), _logits_loss, groups))


# --------------------------------------------------------------------------- embeddings, norms, dropout, tying
class Tied(nn.Module):
    """A tiny language model whose output layer shares the embedding's weight."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def _token_batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(0, 11, (4, L), generator=g)
    return tokens, torch.randint(0, 11, (4, L), generator=g)


def _lm_loss(model: Any, batch: Any) -> Tensor:
    tokens, targets = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


class Bag(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 6, mode=mode)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(tokens)))


def _conv_with(norm: nn.Module, dropout: Optional[nn.Module] = None) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(2, 4, 3), norm, nn.Tanh()]
    if dropout is not None:
        layers.append(dropout)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES))


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "layer norm": lambda: _conv_with(nn.LayerNorm([4, 4, 4])),
    "rms norm": lambda: _conv_with(nn.RMSNorm([4, 4])),
    "group norm": lambda: _conv_with(nn.GroupNorm(2, 4)),
    "instance norm": lambda: _conv_with(nn.InstanceNorm2d(4)),
    "instance norm, affine, running stats": lambda: _conv_with(nn.InstanceNorm2d(4, affine=True,
                                                                                 track_running_stats=True)),
    "batch norm": lambda: _conv_with(nn.BatchNorm2d(4)),
    "dropout": lambda: _conv_with(nn.GroupNorm(1, 4), nn.Dropout(0.3)),
    "dropout2d": lambda: _conv_with(nn.GroupNorm(1, 4), nn.Dropout2d(0.3)),
    "alpha dropout": lambda: _conv_with(nn.GroupNorm(1, 4), nn.AlphaDropout(0.3)),
    "feature alpha dropout": lambda: _conv_with(nn.GroupNorm(1, 4), nn.FeatureAlphaDropout(0.3)),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_layer(case: str) -> None:
    torch.manual_seed(0)
    model = LAYERS[case]().double().train()
    _assert_exact(_check(model, _seq_batch((4, 2, 6, 6)), _logits_loss, _groups(model)))


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_with_weight_tying(scale_grad_by_freq: bool) -> None:
    torch.manual_seed(0)
    model = Tied().double()
    model.embed.scale_grad_by_freq = scale_grad_by_freq
    assert len(list(model.parameters())) == 4  # the tied weight once
    groups = [{"params": [model.embed.weight]}, {"params": list(model.mix.parameters())}, {"params": [model.out.bias]}]
    _assert_exact(_check(model, _token_batch, _lm_loss, groups))


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_embedding_bag(mode: str) -> None:
    torch.manual_seed(0)
    model = Bag(mode).double()

    def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randint(0, 11, (4, L), generator=g), torch.randint(0, CLASSES, (4,), generator=g)

    groups = [{"params": list(model.bag.parameters())}, {"params": list(model.head.parameters())}]
    _assert_exact(_check(model, batch, _logits_loss, groups))
