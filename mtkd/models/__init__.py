"""The mtkd model zoo: CIFAR-style networks behind one registry, and an adapter for others.

Every network maps ``[B, in_channels, H, W]`` images (H, W >= 16; CIFAR 32x32 and
Fashion-MNIST 28x28 included) to ``Outputs(logits [B, C], embedding [B, D], feature
[B, K, H', W'])`` (docs/method.md §1) and has the attributes ``num_classes``,
``in_channels``, ``embedding_dim`` and ``feature_channels``.

Example:
    >>> from mtkd.models import create_model, list_models
    >>> list_models("resnet*")
    >>> student = create_model("resnet56", num_classes=100)
"""
from mtkd.models._factory import MODELS, count_parameters, create_model, list_models
from mtkd.models.adapter import ModelAdapter
from mtkd.models.outputs import Outputs

# Imported for their @MODELS.register side effects.
from mtkd.models import mobilenetv2, regnet, resnet, shufflenetv2, vgg, wrn  # noqa: F401
from mtkd.models import segmentation  # noqa: F401  (registers SEG_MODELS: dense heads on the zoo's backbones)

__all__ = ["MODELS", "ModelAdapter", "Outputs", "count_parameters", "create_model", "list_models"]
