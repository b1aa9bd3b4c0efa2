"""Shared test helpers: seeds, random inputs at the gate ranges users train with, error norms."""
from __future__ import annotations

import os
import random
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the oracle module


def pytest_collection_modifyitems(config, items):
    have_gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip)


SEED_OFFSET = int(os.environ.get("TITANS_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed(request):
    """A stable seed per test (str hash() is randomised per process); TITANS_TEST_SEED=n draws
    another set of inputs everywhere, to check that no test passes by luck of its seed."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + SEED_OFFSET) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; inf when a is not finite where b is."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all() and torch.isfinite(b).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def make_weights(H, D, hidden, depth, dtype=torch.float64, device="cpu", lead=None):
    """L weights [*lead, d_in, d_out] with scale 1/sqrt(d_in): D -> hidden -> ... -> D."""
    dims = [D] + [hidden] * (depth - 1) + [D]
    lead = (H,) if lead is None else lead
    return tuple(torch.randn(*lead, a, b, dtype=dtype, device=device) / a ** 0.5
                 for a, b in zip(dims[:-1], dims[1:]))


def make_inputs(B, T, H, D, dtype=torch.float64, device="cpu", resets=True, lr_max=0.5):
    """q, k, v, lr, forget, momentum as users train with: unit-norm keys, lr in [0, lr_max],
    forget and momentum over all of [0, 1], with exact alpha = 1 resets, eta = 0 and lr = 0.
    forget is drawn as u^3 (median 0.125): still all of [0, 1], but mostly the mild forgetting
    users train with, since a memory erased within a few tokens puts LayerNorm on a vanishing
    vector, where every implementation's rounding is amplified (README, precision)."""
    q = torch.randn(B, T, H, D, dtype=dtype, device=device)
    k = torch.randn(B, T, H, D, dtype=dtype, device=device)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, H, D, dtype=dtype, device=device)
    lr = torch.rand(B, T, H, dtype=dtype, device=device) * lr_max
    forget = torch.rand(B, T, H, dtype=dtype, device=device) ** 3
    momentum = torch.rand(B, T, H, dtype=dtype, device=device)
    if resets and T > 2:
        forget[..., T // 2, 0] = 1.0
        momentum[..., T // 3, -1] = 0.0
        lr[..., 1, 0] = 0.0
    return q, k, v, lr, forget, momentum


def needs_kernels(device="cuda"):
    """Fails (not skips) a GPU test when the kernels cannot run on this GPU: on a GPU runner
    that is a broken build, not a reason to pass quietly."""
    import pytest
    from titans_cuda import _lib
    reason = _lib.kernels_unavailable_reason(torch.device(device)) \
        if torch.cuda.is_available() else "no GPU"
    if reason is not None:
        pytest.fail(f"the kernels cannot run on this GPU: {reason}")
