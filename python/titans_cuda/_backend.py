"""Choosing between the kernels and the reference, in one place.

backend="torch": the reference. backend="cuda": the kernels, or a RuntimeError saying why
not. backend="auto": the kernels when the inputs are on a GPU and the configuration is
supported, else the reference, with one warning per unsupported configuration on a GPU.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _lib
from ._checks import BACKENDS, check_choice

_warned = set()


def use_kernels(backend: str, fn: str, device: torch.device,
                unsupported: Optional[str]) -> bool:
    """``unsupported``: None when a kernel exists for this configuration, else the reason."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "torch":
        return False
    reason = _lib.kernels_unavailable_reason(device)
    if reason is None:
        reason = unsupported
    if backend == "cuda":
        if reason is not None:
            raise RuntimeError(f"titans_cuda.{fn}(backend='cuda') cannot run: {reason}. "
                               f"Use backend='auto' or 'torch' for the reference.")
        return True
    if reason is not None and device.type == "cuda":
        key = (fn, reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"titans_cuda.{fn}: using the PyTorch reference on {device} because "
                          f"{reason}", RuntimeWarning, stacklevel=3)
    return reason is None
