"""The new head on the backbone: one Linear layer, or fastai's two-layer head on average and max pooling.

``mlp`` is fastai's ``create_head`` with its defaults (``vision_learner``'s head): the feature map pooled
both ways and concatenated, then BatchNorm, dropout 0.25, ``Linear(2C, 512)``, ReLU, BatchNorm, dropout 0.5,
``Linear(512, classes)``, the Linear layers without bias after BatchNorm. The pooling replaces the backbone's
own, so the classifier block still receives pooled vectors (now ``2C`` of them) and the frozen-feature cache
stores those: the backbone runs once per fit for either head.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from transfer_lightning.errors import UserInputError

HeadName = Literal["linear", "mlp"]

#: fastai's hidden width (``create_head``'s ``lin_ftrs=[512]``) and last dropout (``ps=0.5``; half of it first).
HIDDEN_FEATURES, DROPOUT = 512, 0.5


class ConcatPool2d(nn.Module):
    """Average and max pooling of a (N, C, H, W) map, concatenated: (N, 2C, 1, 1), the average first."""

    def forward(self, maps: Tensor) -> Tensor:
        return torch.cat([maps.mean((-2, -1), keepdim=True), maps.amax((-2, -1), keepdim=True)], dim=1)


class MLPHead(nn.Sequential):
    """fastai's head on pooled features (module docstring); ``in_features`` and ``out_features`` as a Linear's.

    It flattens its input first: ConvNeXt's classifier block receives (N, 2C, 1, 1), the others (N, 2C).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = HIDDEN_FEATURES, dropout: float = DROPOUT):
        super().__init__(
            nn.Flatten(),
            nn.BatchNorm1d(in_features),
            nn.Dropout(dropout / 2),
            nn.Linear(in_features, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes, bias=False),
        )
        self.in_features, self.out_features = in_features, num_classes
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight)  # as fastai's create_head


def pool_both_ways(network: nn.Module, backbone: str) -> None:
    """Make a torchvision ``network`` pool its last feature map by :class:`ConcatPool2d`, in place.

    Most families pool in a top-level ``avgpool`` module (ResNet, RegNet, EfficientNet, MobileNetV3, ConvNeXt),
    which is replaced; MobileNetV2 pools in its ``forward`` right after ``features``, so the pooling is
    appended to ``features`` (its 1x1 output then passes the forward's own pooling unchanged). Other
    families pool elsewhere (DenseNet after a ReLU in ``forward``), or keep no map (ViT): refused.
    """
    pool = getattr(network, "avgpool", None)
    if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)):
        network.avgpool = ConcatPool2d()
    elif type(network).__name__ == "MobileNetV2":
        network.features.append(ConcatPool2d())
    else:
        raise UserInputError(
            f"model.head mlp pools the last feature map two ways, and {backbone} pools it where it cannot be "
            "replaced: use it with a ResNet, RegNet, EfficientNet, MobileNet or ConvNeXt of torchvision, or a "
            "convolutional timm backbone (timm/NAME); or keep model.head linear."
        )
