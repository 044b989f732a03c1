"""Inference-only rewrites of a frozen network: batch-norm folded into the preceding convolution, and
the weights of autocast's low-precision ops stored in that precision.

Both are for teachers (eval mode, no gradients) and change the module in place. Folding changes
float32 results only by rounding (within 1e-6 relative on the zoo's networks); storing the
conv/linear weights in the autocast dtype changes nothing at all under that autocast, it only
saves the cast autocast would otherwise make at every forward.

Which pairs fold:

* a ``Conv{1,2,3}d`` directly followed by a ``BatchNorm{1,2,3}d`` in an ``nn.Sequential`` (the
  zoo's ``conv_bn``, torchvision's ``downsample``): a Sequential feeds the conv's output to the
  batch-norm alone;
* the pairs a module declares in ``batchnorm_folds``, a tuple of ``(conv_name, bn_name)`` child
  names, meaning "``bn_name`` is only ever applied to the output of ``conv_name``, and that output is
  used nowhere else" (e.g. ``WideBlock``: ``(("conv1", "bn2"),)``).

A pair is left alone when either module has hooks or parametrizations, when the batch-norm is in
training mode or has no running statistics, or when the shapes do not match.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not any(type(conv) is c and type(bn) is b for c, b in _CONV_BN):
        return False
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return False
    if conv.out_channels != bn.num_features:
        return False
    for module in (conv, bn):
        if module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module):
            return False
    return True


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    """``bn(conv(x)) == conv'(x)``: scale each output channel's weights, add the shift as a bias.
    Computed in float64, stored in the conv's dtype."""
    dtype = conv.weight.dtype
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.to(dtype).contiguous(memory_format=_format_of(conv.weight)),
                               requires_grad=False)
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False)


def _format_of(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _candidate_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    pairs = list(getattr(parent, "batchnorm_folds", ()))
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        pairs += list(zip(names, names[1:]))
    return pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eligible batch-norm of ``model`` (in eval mode) into the convolution before it,
    in place: the conv gains a bias and the batch-norm becomes ``nn.Identity``.

    Returns:
        The number of batch-norms folded.
    """
    folded = 0
    for parent in list(model.modules()):
        for conv_name, bn_name in _candidate_pairs(parent):
            conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
            if conv is None or bn is None or not _foldable(conv, bn):
                continue
            _fold_into(conv, bn)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded


LOW_PRECISION_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
"""Modules whose forward is an op that autocast runs in its low-precision dtype (convolutions and
``linear``), casting weight and bias to that dtype."""


@torch.no_grad()
def store_low_precision_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights and biases of ``model``'s convolutions and linear layers in ``dtype`` (in place).

    Under ``torch.autocast(dtype=dtype)`` these ops cast their weights to ``dtype`` anyway, so the
    results are bit-identical; only the per-forward cast (a read of every weight and a write of its
    copy) disappears. Batch-norm and other parameters keep their dtype. Returns the number of
    modules changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, LOW_PRECISION_MODULES) and not parametrize.is_parametrized(module):
            for name in ("weight", "bias"):
                param = module._parameters.get(name)
                if param is not None and param.is_floating_point() and param.dtype != dtype:
                    module._parameters[name] = nn.Parameter(param.to(dtype), requires_grad=False)
            changed += 1
    return changed
