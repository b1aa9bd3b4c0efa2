"""The hand-written adjoint of one chunk (ops/neural_memory/chunk_vjp.py, the fused backward
kernel's blueprint) against autograd through reference.chunk_step, in float64: every input's
cotangent, for depth 1-3, both reads, LayerNorm +- bias, residual, silu/gelu, inactive slots at
both ends of the chunk, and gates with exact zeros (alpha = 1, eta = 0, lr = 0)."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import rel_err
from titans_cuda.ops.neural_memory import chunk_vjp, reference as ref

CASES = list(itertools.product((1, 2, 3), ("token", "chunk"), ("none", "ln", "lnb"),
                               (False, True), ("silu", "gelu")))


def _inputs(depth, ln, residual, act, N=2, H=2, C=6, D=4, hidden=5):
    dt = torch.float64
    q, k, v = (torch.randn(N, H, C, D, dtype=dt) for _ in range(3))
    lr = torch.rand(N, H, C, dtype=dt)
    decay = 1 - torch.rand(N, H, C, dtype=dt) ** 2
    eta = torch.rand(N, H, C, dtype=dt)
    decay[0, 0, 2] = 0.0  # alpha = 1: a reset inside the chunk
    eta[1, 1, 3] = 0.0
    lr[0, 1, 1] = 0.0
    active = torch.ones(N, 1, C, dtype=dt)
    active[0, 0, 0] = 0.0  # an offset slot before the sequence
    active[1, 0, -2:] = 0.0  # slots after it
    lr, decay, eta = (torch.where(active.bool(), g, torch.full_like(g, f))
                      for g, f in ((lr, 0.0), (decay, 1.0), (eta, 1.0)))
    dims = [D] + [hidden] * (depth - 1) + [D]
    shapes = list(zip(dims[:-1], dims[1:]))
    w0 = [torch.randn(N, H, a, b, dtype=dt) / a ** 0.5 for a, b in shapes]
    s0 = [0.3 * torch.randn(N, H, a, b, dtype=dt) for a, b in shapes]
    wg = [w + 0.1 * torch.randn_like(w) for w in w0]
    mlp = dict(activation=act, residual=residual,
               ln_weight=(1 + 0.2 * torch.randn(H, 1, D, dtype=dt)) if ln != "none" else None,
               ln_bias=(0.2 * torch.randn(H, 1, D, dtype=dt)) if ln == "lnb" else None,
               ln_eps=1e-6)
    return [q, k, v, lr, decay, eta], active, w0, s0, wg, mlp


@pytest.mark.parametrize("depth,read,ln,residual,act", CASES)
def test_chunk_vjp_matches_autograd(depth, read, ln, residual, act):
    xs, active, w0, s0, wg, mlp = _inputs(depth, ln, residual, act)
    params = [p for p in (mlp["ln_weight"], mlp["ln_bias"]) if p is not None]
    leaves = [t.clone().requires_grad_(True) for t in (*xs, *w0, *s0, *wg, *params)]
    L = depth
    q, k, v, lr, decay, eta = leaves[:6]
    lw0, ls0, lwg = leaves[6:6 + L], leaves[6 + L:6 + 2 * L], leaves[6 + 2 * L:6 + 3 * L]
    lmlp = dict(mlp)
    if params:
        lmlp["ln_weight"] = leaves[6 + 3 * L]
        lmlp["ln_bias"] = leaves[6 + 3 * L + 1] if len(params) == 2 else None
    o, w_new, s_new = ref.chunk_step(q, k, v, lr, decay, eta, active, lw0, ls0, lwg, mlp=lmlp,
                                     read=read)
    o_bar = torch.randn_like(o)
    w_bar = [torch.randn_like(w) for w in w_new]
    s_bar = [torch.randn_like(s) for s in s_new]
    want = torch.autograd.grad([o, *w_new, *s_new], leaves, [o_bar, *w_bar, *s_bar],
                               allow_unused=True)
    got = chunk_vjp.chunk_step_vjp(*xs, active, w0, s0, wg, o_bar, w_bar, s_bar, mlp=mlp,
                                   read=read)
    flat = [got["q"], got["k"], got["v"], got["lr"], got["decay"], got["eta"], *got["w0"],
            *got["s0"], *got["wg"]] + ([got["ln_weight"]] if params else []) + (
            [got["ln_bias"]] if len(params) == 2 else [])
    names = ["q", "k", "v", "lr", "decay", "eta"] + [f"{n}{i}" for n in ("w0", "s0", "wg")
                                                   for i in range(L)] + ["ln_w", "ln_b"]
    for name, a, b in zip(names, flat, want):
        b = torch.zeros_like(a) if b is None else b
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert rel_err(a, b) < 1e-9, (name, rel_err(a, b))
