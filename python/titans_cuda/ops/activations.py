"""Activations of the memory MLP with their explicit derivatives (SPEC §1).

Only two are supported: ``silu`` and ``gelu`` in its exact erf form. The derivative is written
out by hand because the inner loop's gradient (the "surprise") is an explicit formula in the
reference; autograd through these formulas gives the outer loop's second-order terms.
"""
from __future__ import annotations

import math

import torch

ACTIVATIONS = ("silu", "gelu")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activate(z: torch.Tensor, name: str) -> torch.Tensor:
    """phi(z) elementwise."""
    if name == "silu":
        return z * torch.sigmoid(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT2))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activate_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """phi'(z) elementwise."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
