"""The device a run uses, and the one mixed-precision policy every part of fsbench follows.

bf16 autocast on CUDA devices that support it, fp16 on older GPUs, full precision on CPU: the feature
cache, the training loops and evaluation all ask `amp_dtype`, so a feature cached by one part is computed
at the precision another expects.
"""

from __future__ import annotations

import resource

import torch

from fsbench.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision: bf16 where supported, fp16 on older GPUs, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> torch.autocast:
    """`torch.autocast` with the policy of `amp_dtype` (disabled on CPU)."""
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def precision_name(device: torch.device) -> str:
    """The precision features are computed at on `device` (part of the feature cache key)."""
    dtype = amp_dtype(device)
    return "fp32" if dtype is None else ("bf16-autocast" if dtype == torch.bfloat16 else "fp16-autocast")


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory of the run on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
