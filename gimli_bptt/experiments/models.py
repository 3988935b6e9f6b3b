# SPDX-License-Identifier: Apache-2.0
"""The small conv net of the experiments and its one-param-group-per-tensor optimizer groups."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def make_convnet(width: int = 16, num_classes: int = 10, batchnorm: bool = True) -> nn.Sequential:
    """A three-block conv net for 8x8 images: conv-BN-ReLU ×3 with two 2x2 max-pools, then a linear head.

    Args:
        width: Channels of the first block (the others have ``2 * width``): the model size.
        num_classes: Outputs of the linear head.
        batchnorm: Put a BatchNorm after every convolution (the convolutions then have no bias).
    """
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU())
        return layers

    w2 = 2 * width
    return nn.Sequential(
        *block(1, width), *block(width, w2), nn.MaxPool2d(2),     # 8x8 -> 4x4
        *block(w2, w2), nn.MaxPool2d(2),                           # 4x4 -> 2x2
        nn.Flatten(), nn.Linear(w2 * 4, num_classes),
    )


def per_tensor_groups(model: nn.Module) -> tuple[list[dict[str, Any]], list[str]]:
    """One optimizer param group per parameter tensor (the paper's per-group learning rates).

    Returns:
        The param groups and the parameter name of each group.
    """
    named = list(model.named_parameters())
    return [{"params": [p]} for _, p in named], [n for n, _ in named]


def cross_entropy(model: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The training and validation loss of every experiment: cross-entropy of ``model(x)`` and ``y``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


__all__ = ["cross_entropy", "make_convnet", "per_tensor_groups"]
