"""Pure-PyTorch reference of the memory MLP (SPEC §1) and of its inner gradient (SPEC §2).

Shapes use the letters of SPEC §5: B batch, T tokens, H heads, D head dim, Dh hidden, L depth,
C chunk size, NC number of chunks. Inside this module tokens sit on dim -2 and features on
dim -1 ("row-vector form"); every leading dim is a batch dim that broadcasts against the
weights' leading dims.

Stages (the kernels use the same names):
  forward_pass   h^0 = x, z^l = h^{l-1} W^l, h^l = phi(z^l) (l < L), f = z^L,
                 y = [x +] [LN_{gamma,beta}](f)
  output_errors  dz^l = dl/dz^l for l = L..1, given dl/dy (LN and activation backward by hand)
  inner_update   u^l = sum_t w_t h^{l-1}_t^T dz^l_t  (the token-weighted sum of gradients)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..activations import activate, activate_grad


@dataclass
class ForwardCache:
    """What the backward pass needs: layer inputs h^{l-1}, pre-activations z^l, LN stats."""

    h: list  # L tensors [..., C, d_in_l]: the inputs of each layer (h[0] = x)
    z: list  # L tensors [..., C, d_out_l]: pre-activations (z[-1] = f)
    xhat: Optional[torch.Tensor]  # [..., C, D] normalised f, when LayerNorm is on
    rstd: Optional[torch.Tensor]  # [..., C, 1] 1/sqrt(var + eps), when LayerNorm is on


def forward_pass(x, weights: Sequence[torch.Tensor], *, activation, residual, ln_weight, ln_bias,
                 ln_eps):
    """y = M_W(x). x [..., C, D]; weights[l] [..., d_in, d_out] broadcastable with x's leading
    dims; ln_weight / ln_bias broadcastable to [..., C, D] (or None). Returns (y, cache)."""
    hs, zs = [], []
    h = x
    n_layers = len(weights)
    for layer, w in enumerate(weights):
        hs.append(h)
        z = torch.matmul(h, w)
        zs.append(z)
        h = activate(z, activation) if layer < n_layers - 1 else z
    y, xhat, rstd = output_head(h, x, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                                ln_eps=ln_eps)
    return y, ForwardCache(hs, zs, xhat, rstd)


def output_head(f, x, *, residual, ln_weight, ln_bias, ln_eps):
    """y = [x +] [LN_{gamma,beta}](f); returns (y, xhat, rstd), the LN stats None without LN."""
    xhat = rstd = None
    if ln_weight is not None:
        centered = f - f.mean(dim=-1, keepdim=True)
        rstd = torch.rsqrt((centered * centered).mean(dim=-1, keepdim=True) + ln_eps)
        xhat = centered * rstd
        f = xhat * ln_weight
        if ln_bias is not None:
            f = f + ln_bias
    return (x + f if residual else f), xhat, rstd


def output_errors(dy, cache: ForwardCache, weights: Sequence[torch.Tensor], *, activation,
                  ln_weight):
    """Back-propagate dl/dy to dl/dz^l for every layer; returns the list [dz^1, ..., dz^L].

    The residual branch adds x, which does not depend on W, so it contributes nothing here."""
    if ln_weight is not None:
        g = dy * ln_weight
        xhat = cache.xhat
        df = cache.rstd * (g - g.mean(dim=-1, keepdim=True)
                           - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    else:
        df = dy
    n_layers = len(weights)
    dz = [None] * n_layers
    dz[-1] = df
    for layer in range(n_layers - 2, -1, -1):
        dh = torch.matmul(dz[layer + 1], weights[layer + 1].transpose(-1, -2))
        dz[layer] = dh * activate_grad(cache.z[layer], activation)
    return dz


def loss_errors(k, v, weights, *, activation, residual, ln_weight, ln_bias, ln_eps):
    """Everything a write needs from keys and values at weights W: for
    l(W; k, v) = ||M_W(k) - v||^2 returns (cache, dz) with dl/dW^l = h^{l-1}^T dz^l per token."""
    y, cache = forward_pass(k, weights, activation=activation, residual=residual,
                            ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps)
    dz = output_errors(2.0 * (y - v), cache, weights, activation=activation, ln_weight=ln_weight)
    return cache, dz


def inner_update(cache: ForwardCache, dz, token_weight):
    """u^l = sum_t token_weight_t * h^{l-1}_t^T dz^l_t; token_weight [..., C]."""
    return [torch.matmul(h.transpose(-1, -2), d * token_weight.unsqueeze(-1))
            for h, d in zip(cache.h, dz)]


# --------------------------------------------------------------------------------------------
# The building blocks of SPEC §5 on [B, T, H, D] inputs.
# --------------------------------------------------------------------------------------------

def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (the test oracle), else float32 (SPEC: fp32 math)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _ln_params(ln_weight, ln_bias, dtype, n_mid):
    """[H, D] -> [H, 1 x n_mid, D] so that it broadcasts against [B, H, ..., C, D]."""
    def shape(p):
        if p is None:
            return None
        return p.to(dtype).reshape(p.shape[0], *([1] * n_mid), p.shape[1])
    return shape(ln_weight), shape(ln_bias)


def _chunked_layout(x, weights, chunk_size, dtype):
    """x [B, T, H, F] -> [B, H, NC, C, F] (zero-padded to NC*C tokens) with weights as
    [B|1, H, NC|1, d_in, d_out]. Shared ([H,...]) and per-row ([B,H,...]) weights use one
    "chunk" spanning the whole sequence unless chunk_size is given."""
    B, T, H, F = x.shape
    C = chunk_size if chunk_size is not None else max(T, 1)
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    xt = x.to(dtype).permute(0, 2, 1, 3)
    if pad:
        xt = torch.nn.functional.pad(xt, (0, 0, 0, pad))
    xt = xt.reshape(B, H, n_chunks, C, F)
    ws = []
    for w in weights:
        w = w.to(dtype)
        if w.dim() == 3:
            w = w.unsqueeze(0).unsqueeze(2)
        elif w.dim() == 4:
            w = w.unsqueeze(2)
        ws.append(w)
    return xt, ws, n_chunks, C


def memory_forward(x, weights, *, chunk_size=None, activation="silu", residual=False,
                   ln_weight=None, ln_bias=None, ln_eps=1e-6):
    """Reference of titans_cuda.memory_forward: y = M_W(x), x [B, T, H, D] -> y like x."""
    B, T, H, D = x.shape
    dtype = compute_dtype(x, *weights)
    xt, ws, n_chunks, C = _chunked_layout(x, weights, chunk_size, dtype)
    g, b = _ln_params(ln_weight, ln_bias, dtype, 2)
    y, _ = forward_pass(xt, ws, activation=activation, residual=residual, ln_weight=g,
                        ln_bias=b, ln_eps=ln_eps)
    y = y.reshape(B, H, n_chunks * C, D)[:, :, :T].permute(0, 2, 1, 3)
    return y.to(x.dtype)


def memory_grad(k, v, lr, weights, *, chunk_size, activation="silu", residual=False,
                ln_weight=None, ln_bias=None, ln_eps=1e-6):
    """Reference of titans_cuda.memory_grad: U_j = sum_{t in chunk j} lr_t grad_W l(W; k_t, v_t).
    k, v [B, T, H, D]; lr [B, T, H]; returns a tuple of [B, H, NC, d_in, d_out] (fp32/fp64)."""
    dtype = compute_dtype(k, v, *weights)
    kt, ws, n_chunks, C = _chunked_layout(k, weights, chunk_size, dtype)
    vt, _, _, _ = _chunked_layout(v, weights, chunk_size, dtype)
    lrt, _, _, _ = _chunked_layout(lr.unsqueeze(-1), weights, chunk_size, dtype)
    g, b = _ln_params(ln_weight, ln_bias, dtype, 2)
    cache, dz = loss_errors(kt, vt, ws, activation=activation, residual=residual, ln_weight=g,
                            ln_bias=b, ln_eps=ln_eps)
    # padded tokens have lr = 0 and so add nothing
    return tuple(inner_update(cache, dz, lrt.squeeze(-1)))
