"""Shared pieces of the CIFAR-style networks: the base class, weight init and small layers.

Every network here is ``stem -> stages -> head -> global average pool -> classifier`` and
returns :class:`~mtkd.models.outputs.Outputs` (docs/method.md §1):

- ``feature``   ``[B, K, H', W']`` the output of ``head`` (the last stage's map after its last
  activation, i.e. exactly the tensor that is pooled);
- ``embedding`` ``[B, D]`` its global average (``D == K``), the input of ``classifier``;
- ``logits``    ``[B, num_classes]`` ``classifier(embedding)``.
"""
from __future__ import annotations

import torch
from torch import nn

from mtkd.models.outputs import Outputs


def check_sizes(num_classes: int, in_channels: int) -> None:
    """Raise ``ValueError`` unless ``num_classes >= 2`` and ``in_channels >= 1`` (both ints)."""
    for label, value, low in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an int >= {low}; got {value!r}")


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional ReLU.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))  # in place on the fresh BN output only
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Reference-repo initialisation: Kaiming normal (fan_out, ReLU) for convs with zero bias,
    BatchNorm weight 1 and bias 0; ``nn.Linear`` keeps PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ClassifierNet(nn.Module):
    """Base of every mtkd network: ``stem -> stages -> head -> GAP -> classifier``.

    Subclasses call ``super().__init__(num_classes, in_channels)``, assign ``self.stem``,
    ``self.stages`` and ``self.head`` and finish with ``self._add_classifier(channels)``.

    Attributes:
        num_classes: C, the width of ``logits``.
        in_channels: channels of the input images.
        feature_channels: K, channels of ``feature``.
        embedding_dim: D (equal to K), the width of ``embedding``.
        classifier: ``nn.Linear(D, C)``; ``logits == classifier(embedding)``.
    """

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        check_sizes(num_classes, in_channels)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stem: nn.Module = nn.Identity()
        self.stages: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Identity()

    def _add_classifier(self, feature_channels: int) -> None:
        self.feature_channels = feature_channels
        self.embedding_dim = feature_channels
        self.classifier = nn.Linear(feature_channels, self.num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W] -> [B, K, H', W']`` (the map that gets pooled)."""
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> Outputs:
        """Args:
            x: ``[B, in_channels, H, W]`` images, H and W >= 16.

        Returns:
            ``Outputs(logits [B, C], embedding [B, D], feature [B, K, H', W'])``.
        """
        feature = self.forward_features(x)
        embedding = feature.mean(dim=(2, 3))
        return Outputs(self.classifier(embedding), embedding, feature)
