"""Devices and numeric precision: which device a run uses, whether it runs bf16 natively, and the
autocast context of a precision.

Precisions are named ``fp32`` (exact), ``bf16`` and ``fp16``. Reduced precision means
``torch.autocast`` on the device plus the channels_last memory format, which is what makes
convolutions fast on CPUs with AMX-BF16 and on tensor-core GPUs, and sometimes on CPUs with only
AVX512-BF16 (no flag predicts it: a teacher's ``auto`` is decided by measuring it,
:mod:`mtkd.precision_probe`; :func:`runs_faster` is the flag-based guess). Losses are always computed
in fp32.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from mtkd.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(UserError, ValueError):
    """A device this machine does not have, or an unknown precision, was asked for."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cuda[:N]`` is checked to exist.

    Raises:
        DeviceError: CUDA asked for but not available, or ``cuda:N`` beyond the visible GPUs.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here (torch "
                              f"{torch.__version__}); use device 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


@functools.lru_cache(maxsize=None)
def runs_natively(device_type: str, precision: str) -> bool:
    """Whether ``precision`` has native fast kernels on this machine's ``device_type``.

    CPU bf16 needs AMX or AVX512-BF16 (oneDNN says), CPU fp16 AVX512-FP16 or AMX-FP16; CUDA bf16 needs
    compute capability 8.0+, CUDA fp16 any GPU. fp32 is always native.
    """
    if precision == "fp32":
        return True
    if device_type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        check = torch.ops.mkldnn._is_mkldnn_bf16_supported if precision == "bf16" else \
            torch.ops.mkldnn._is_mkldnn_fp16_supported
        return bool(torch.backends.mkldnn.is_available() and check())
    return False


@functools.lru_cache(maxsize=None)
def runs_faster(device_type: str, precision: str) -> bool:
    """Whether ``precision`` makes convolutions faster than fp32 on this machine's ``device_type``.

    CUDA: wherever it runs natively (tensor cores). CPU: only with AMX tiles (AMX-BF16 for bf16,
    AMX-FP16 for fp16). AVX512-BF16 or AVX512-FP16 alone run them natively but not faster: oneDNN's
    bf16 and fp16 convolutions measured 41-46 GMAC/s per core against 71-78 for fp32 channels_last on
    such a Xeon (AMX hidden by its hypervisor), where four CIFAR teachers ran 0.86-0.93x as fast in
    bf16 as in fp32.
    """
    if precision == "fp32" or not runs_natively(device_type, precision):
        return False
    if device_type == "cuda":
        return True
    if device_type == "cpu":
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(capabilities.get("amx_bf16" if precision == "bf16" else "amx_fp16"))
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where it is faster than fp32 on ``device`` (:func:`runs_faster`: a GPU with
    bf16, a CPU with AMX), else ``fp32``; an explicit precision that is emulated on this device is
    kept, with a warning (it is then slower, not faster)."""
    if name == "auto":
        return "bf16" if runs_faster(device.type, "bf16") else "fp32"
    if name not in DTYPES:
        raise DeviceError(f"unknown precision {name!r} (valid: auto, {', '.join(DTYPES)})")
    if not runs_natively(device.type, name):
        warnings.warn(f"precision {name} has no native kernels on this {device.type}; it will be emulated "
                      f"(slower than fp32)", stacklevel=2)
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a reduced ``precision`` on ``device``; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def memory_format(precision: str) -> torch.memory_format:
    """channels_last for reduced precision (the fast layout of oneDNN and tensor cores), else contiguous
    (fp32 stays the exact mode, identical to the reference code's layout)."""
    return torch.contiguous_format if precision == "fp32" else torch.channels_last


def device_name(device: torch.device) -> str:
    """What a speed figure was measured on: the GPU's name, else the CPU's model name
    (``/proc/cpuinfo``; the platform's processor elsewhere, or ``cpu``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "cpu"


def numerics_tag(device: torch.device, precision: str, variant: str = "") -> str:
    """How outputs are computed: device kind (the GPU's name on CUDA), precision, an optional variant
    of the computation (``foldbn``: batch-norm folded into the convolutions; ``compiled``...) and torch
    version, e.g. ``cpu-bf16-torch2.13.0`` or ``cpu-bf16-foldbn-torch2.13.0``. Outputs cached under
    one tag are not reused under another, since other kernels give other last bits."""
    kind = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else device.type
    return f"{kind}-{precision}{'-' + variant if variant else ''}-torch{torch.__version__}"
