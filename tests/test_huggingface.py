# SPDX-License-Identifier: Apache-2.0
"""HuggingFace ``transformers`` models and ``peft`` LoRA adapters, built from tiny random-init
configs (nothing downloaded): each hypergradient exact against the float64 autograd unroll.

The losses are our own cross-entropy of ``.logits``, never the model's ``labels=`` loss:
transformers' ``ForCausalLMLoss`` and its siblings (``transformers/loss/loss_utils.py``) upcast
the logits with ``logits.float()``, which turns float64 logits into float32 and would limit
every check to float32's round-off.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimli_bptt import GimliUpdater
from gimli_bptt.testing import check_hypergradients

try:
    import peft
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, ViTConfig, ViTForImageClassification)

    HF_SKIP: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - absent, or built for another torch
    HF_SKIP = f"transformers and peft are not importable here ({type(exc).__name__}: {str(exc)[:120]})"

pytestmark = pytest.mark.skipif(HF_SKIP is not None, reason=HF_SKIP or "")

D = torch.float64
VOCAB, SEQ, BATCH, CLASSES = 13, 6, 3, 3
#: float64's unit round-off (1.1e-16) grown through two blocks of attention and normalisation,
#: two or three inner steps and their Hessian-vector products: the hypergradients here are sums
#: whose terms exceed the result by at most about 1e3 (Adam's beta2 terms scale with
#: 1 / (1 - beta2); Adam's 1/eps at the coordinates whose gradient is zero: the LoRA B = 0 start,
#: GPT-2's last position embedding), over some 1e3 multiply-adds per entry: a few 1e-13 at worst. A
#: wrong or missing term (one step's second-order term, one group's learning rate) is O(1).
TOL = 1e-9

LossFn = Callable[[Any, Any], Tensor]


# --------------------------------------------------------------------------- models and losses
def _tokens(g: torch.Generator) -> Tensor:
    return torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)


def _labelled_tokens(g: torch.Generator) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    tokens[1, -2:] = 0  # padding, masked out by the attention mask
    return tokens, torch.randint(0, CLASSES, (BATCH,), generator=g)


def _images(g: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(BATCH, 3, 8, 8, dtype=D, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def lm_loss(model: Any, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of the logits (in float64: see the module's docstring)."""
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def classify_loss(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    tokens, y = batch
    return F.cross_entropy(model(input_ids=tokens, attention_mask=(tokens != 0).long()).logits, y)


def image_loss(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(pixel_values=x).logits, y)


def _float64(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().double().train()


def gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=2, n_head=2, n_inner=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    return _float64(lambda: GPT2LMHeadModel(config))


def llama() -> nn.Module:
    """RMSNorm, rotary embeddings, SwiGLU, grouped-query attention (2 key/value heads for 4 query heads)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         hidden_act="silu", bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="eager")
    return _float64(lambda: LlamaForCausalLM(config))


def bert() -> nn.Module:
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=SEQ, num_labels=CLASSES, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return _float64(lambda: BertForSequenceClassification(config))


def vit() -> nn.Module:
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=12, num_labels=CLASSES, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return _float64(lambda: ViTForImageClassification(config))


def with_lora(model: nn.Module, targets: list[str], **lora: Any) -> nn.Module:
    """LoRA adapters (rank 2) on ``targets``; peft freezes the base model (requires_grad=False)."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0, **lora)
    return peft.get_peft_model(model, config).double().train()


def _halves(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Two parameter groups: the first half of the tensors and the rest."""
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:]}]


def _check(model: nn.Module, make_batch: Callable[[torch.Generator], Any], loss: LossFn,
           opt: torch.optim.Optimizer, learn: dict[str, str], unroll: int,
           loss_params: Optional[dict[str, Tensor]] = None, val_loss: Optional[LossFn] = None,
           learn_init: bool = False) -> None:
    g = torch.Generator().manual_seed(1)
    batches, val = [make_batch(g) for _ in range(unroll)], make_batch(g)
    updater = GimliUpdater(model, opt, loss, val_loss or loss, unroll=unroll, learn=learn, loss_params=loss_params,
                           learn_init=learn_init)
    errors = check_hypergradients(updater, batches, val)
    assert max(errors.values()) <= TOL, errors
    grads = updater.hypergradient(batches, val).hypergrads
    for name, value in grads.items():  # finite everywhere, and each one moves L_val
        assert torch.isfinite(value).all(), name
        assert float(value.abs().max()) > 0, name


# --------------------------------------------------------------------------- the models
def test_gpt2_adam_learns_lr_and_betas() -> None:
    model = gpt2()
    assert model.config._attn_implementation == "eager"
    opt = torch.optim.Adam(_halves(list(model.parameters())), lr=1e-2)
    _check(model, _tokens, lm_loss, opt, {"lr": "group", "beta1": "group", "beta2": "group"}, unroll=3)


def test_llama_adamw() -> None:
    model = llama()
    layer = model.model.layers[0]
    assert layer.self_attn.k_proj.out_features < layer.self_attn.q_proj.out_features  # grouped-query attention
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm" and hasattr(layer.mlp, "gate_proj")  # SwiGLU
    assert hasattr(model.model, "rotary_emb")
    opt = torch.optim.AdamW(_halves(list(model.parameters())), lr=1e-2, weight_decay=0.1)
    _check(model, _tokens, lm_loss, opt, {"lr": "group", "weight_decay": "group"}, unroll=2)


def test_bert_classifier_with_a_learned_loss_weight() -> None:
    """SGD with momentum; the training loss adds a learned weight times the classifier's squared norm."""
    model = bert()
    weight = torch.tensor(0.05, dtype=D, requires_grad=True)

    def train_loss(m: Any, batch: Any) -> Tensor:
        penalty = sum((p**2).sum() for n, p in m.named_parameters() if n.startswith("classifier."))
        return classify_loss(m, batch) + weight * penalty

    opt = torch.optim.SGD(_halves(list(model.parameters())), lr=0.1, momentum=0.9)
    _check(model, _labelled_tokens, train_loss, opt, {"lr": "group", "momentum": "group"}, unroll=3,
           loss_params={"weight": weight}, val_loss=classify_loss)


def test_vit_rmsprop() -> None:
    model = vit()
    opt = torch.optim.RMSprop(_halves(list(model.parameters())), lr=1e-2)
    _check(model, _images, image_loss, opt, {"lr": "group"}, unroll=2)


@pytest.mark.parametrize("learn_init", [False, True], ids=["adapters", "adapters_and_their_init"])
def test_gpt2_lora(learn_init: bool) -> None:
    """Only the adapters are in the optimizer. peft starts B at zero, so A's gradient is exactly
    zero at the first step (the zero-gradient limit of Adam's step). With learn_init the adapters'
    θ_0 is learned too; the frozen base is a constant either way."""
    model = with_lora(gpt2(), ["c_attn"], fan_in_fan_out=True)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(_halves(adapters), lr=1e-2)
    _check(model, _tokens, lm_loss, opt, {"lr": "group"}, unroll=2, learn_init=learn_init)


def test_llama_lora() -> None:
    model = with_lora(llama(), ["q_proj", "v_proj"], init_lora_weights=False)  # B random: every adapter moves
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _check(model, _tokens, lm_loss, opt, {"lr": "group", "beta1": "group"}, unroll=2)


def test_hf_labels_loss_is_float32() -> None:
    """Why the losses above are our own: transformers' labels= loss computes in float32."""
    model = gpt2()
    tokens = _tokens(torch.Generator().manual_seed(0))
    theirs = model(input_ids=tokens, labels=tokens).loss
    ours = lm_loss(model, tokens)
    assert ours.dtype == D and theirs.dtype == torch.float32
    assert abs(float(theirs.detach()) - float(ours.detach())) <= 1e-6 * float(ours.detach())  # the same loss, rounded to float32
