"""Wrap any image classifier (torchvision, timm, hand-written) into the mtkd output contract."""
from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
from torch import nn

from mtkd.models.outputs import Outputs

_MAX_LISTED = 40


class ModelAdapter(nn.Module):
    """Give an arbitrary classifier the mtkd contract (docs/method.md §1).

    A forward hook on the submodule named ``last_stage`` captures its output as ``feature``
    (it must be ``[B, K, H, W]``); ``embedding`` is its global average ``[B, K]``; ``logits``
    is what the wrapped module returns (the first tensor of a tuple/list, or the ``'logits'``
    entry of a dict).

    ``feature_channels`` and ``embedding_dim`` are ``None`` until the first forward (or a call
    to :meth:`infer_shapes`); ``num_classes`` comes from the argument, else from the classifier
    when it is an ``nn.Linear``, else from the first forward; ``in_channels`` from the argument,
    else from the first ``nn.Conv2d`` of the module.

    Example:
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> model = ModelAdapter(net, last_stage="layer4", classifier="fc")
        >>> out = model(torch.randn(2, 3, 32, 32))   # out.feature: [2, 512, 1, 1]

    Args:
        module: the network, mapping ``[B, C_in, H, W]`` to logits ``[B, C]``.
        last_stage: dotted name of the submodule whose output is the feature map (e.g. ``"layer4"``).
        classifier: dotted name of the final classifier, if any (exposed as ``.classifier``).
        num_classes: C; checked against the logits when given.
        in_channels: input channels; informational.

    Raises:
        ValueError: an unknown ``last_stage`` or ``classifier`` name (lists the available names,
            close matches first).
    """

    def __init__(
        self,
        module: nn.Module,
        last_stage: str,
        classifier: str | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
    ):
        super().__init__()
        self.module = module
        self.last_stage = last_stage
        self.classifier_name = classifier
        stage = _submodule(module, last_stage, "last_stage")
        head = _submodule(module, classifier, "classifier") if classifier is not None else None
        self.num_classes = num_classes if num_classes is not None else getattr(head, "out_features", None)
        self.in_channels = in_channels if in_channels is not None else _first_conv_channels(module)
        self.feature_channels: int | None = None
        self.embedding_dim: int | None = None
        self._captured: torch.Tensor | None = None
        stage.register_forward_hook(self._capture)

    @property
    def classifier(self) -> nn.Module | None:
        """The wrapped module's classifier (not registered twice), or ``None``."""
        if self.classifier_name is None:
            return None
        return self.module.get_submodule(self.classifier_name)

    def _capture(self, stage: nn.Module, inputs: tuple, output: object) -> None:
        self._captured = output  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> Outputs:
        """Args:
            x: ``[B, in_channels, H, W]`` images.

        Returns:
            ``Outputs(logits [B, C], embedding [B, K], feature [B, K, H', W'])``.
        """
        self._captured = None
        try:
            raw = self.module(x)
            feature = self._checked_feature(self._captured)
        finally:
            self._captured = None
        logits = self._checked_logits(_pick_logits(raw))
        embedding = feature.mean(dim=(2, 3))
        self.feature_channels = self.embedding_dim = feature.shape[1]
        return Outputs(logits, embedding, feature)

    def _checked_feature(self, feature: object) -> torch.Tensor:
        if feature is None:
            raise RuntimeError(f"last_stage {self.last_stage!r} did not run during the forward pass")
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
            got = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise ValueError(
                f"last_stage {self.last_stage!r} must output a 4-D feature map [B, K, H, W]; got {got}"
            )
        return feature

    def _checked_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"the wrapped module's logits must be [B, C]; got shape {tuple(logits.shape)}")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        elif logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the wrapped module returned {logits.shape[1]} classes; "
                f"expected num_classes={self.num_classes}"
            )
        return logits

    @torch.no_grad()
    def infer_shapes(self, sample: torch.Tensor) -> None:
        """Run ``sample`` ``[B, C_in, H, W]`` once in eval mode (restoring the mode) to fill in
        ``feature_channels``, ``embedding_dim`` and ``num_classes``."""
        was_training = self.training
        self.eval()
        try:
            self(sample)
        finally:
            self.train(was_training)


def _pick_logits(raw: object) -> torch.Tensor:
    """The logits tensor inside a module's output: itself, a tuple's first tensor, a dict's 'logits'."""
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, Mapping):
        if isinstance(raw.get("logits"), torch.Tensor):
            return raw["logits"]
        raise TypeError(f"the wrapped module returned a mapping without a 'logits' tensor; keys: {list(raw)}")
    if isinstance(raw, (tuple, list)):
        for item in raw:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(
        f"cannot find logits in the wrapped module's output of type {type(raw).__name__}; "
        "expected a tensor, a tuple/list starting with a tensor, or a dict with a 'logits' tensor"
    )


def _submodule(module: nn.Module, name: str, role: str) -> nn.Module:
    """``module``'s submodule called ``name``; ``ValueError`` listing the valid names otherwise."""
    names = [n for n, _ in module.named_modules() if n]
    if name in names:
        return module.get_submodule(name)
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    listed = close + [n for n in names if n not in close]
    more = f", ... ({len(listed) - _MAX_LISTED} more)" if len(listed) > _MAX_LISTED else ""
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown {role} {name!r} in {type(module).__name__}{hint} "
        f"(available submodules: {', '.join(listed[:_MAX_LISTED])}{more})"
    )


def _first_conv_channels(module: nn.Module) -> int | None:
    return next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)
