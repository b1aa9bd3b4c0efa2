"""A slow, independent oracle of SPEC §1-4: one token at a time, gradients by autograd.

Written straight from the SPEC's equations and sharing no code with the package: the memory
MLP uses torch.nn.functional, and u_t = grad_W l(W_c(t); k_t, v_t) comes from torch.func.grad, which
composes with ordinary autograd, so outer gradients flow through it too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp(x, weights, activation, residual, ln_weight, ln_bias, ln_eps):
    """M_W(x) for x [H, D] and weights [H, d_in, d_out] per layer."""
    h = x.unsqueeze(1)  # [H, 1, D]
    for layer, w in enumerate(weights):
        h = torch.bmm(h, w)
        if layer < len(weights) - 1:
            h = F.silu(h) if activation == "silu" else F.gelu(h)
    f = h.squeeze(1)
    if ln_weight is not None:
        f = F.layer_norm(f, f.shape[-1:], eps=ln_eps) * ln_weight
        if ln_bias is not None:
            f = f + ln_bias
    return x + f if residual else f


def run_sequence(q, k, v, lr, forget, momentum, w, s, cw, offset, *, chunk_size, read, **mem):
    """One sequence. q, k, v [T, H, D]; gates [T, H]; w, s, cw lists [H, d_in, d_out];
    offset int. Returns (o [T, H, D], w, s, cw, offset) after the last token."""
    outs = []
    for t in range(q.shape[0]):
        if offset == 0:
            cw = list(w)  # a new chunk starts at the current weights
        u = torch.func.grad(lambda ws: ((mlp(k[t], ws, **mem) - v[t]) ** 2).sum())(cw)
        theta = lr[t].view(-1, 1, 1)
        keep = (1 - forget[t]).view(-1, 1, 1)
        eta = momentum[t].view(-1, 1, 1)
        s = [eta * s_l - theta * u_l for s_l, u_l in zip(s, u)]
        w = [keep * w_l + s_l for w_l, s_l in zip(w, s)]
        outs.append(mlp(q[t], w if read == "token" else cw, **mem))
        offset = (offset + 1) % chunk_size
    o = torch.stack(outs) if outs else q.new_zeros(q.shape)
    return o, w, s, cw, offset


def neural_memory_oracle(q, k, v, lr, forget, momentum, weights, *, chunk_size, activation="silu",
                         residual=False, ln_weight=None, ln_bias=None, ln_eps=1e-6,
                         read="token", initial_state=None, cu_seqlens=None):
    """Returns (o like q, (weights, momentum, chunk_weights, offset)) with per-layer [N, ...]."""
    B, T, H, D = q.shape
    mem = dict(activation=activation, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
               ln_eps=ln_eps)
    if cu_seqlens is None:
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        bounds = list(zip(cu[:-1], cu[1:]))
    flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731
    qf, kf, vf, lrf, fgf, mof = map(flat, (q, k, v, lr, forget, momentum))
    outs, ws, ss, cws, offs = [], [], [], [], []
    for n, (a, b) in enumerate(bounds):
        if initial_state is None:
            w = [wt.to(q.dtype) for wt in weights]
            s = [torch.zeros_like(x) for x in w]
            cw, off = list(w), 0
        else:
            w = [x[n] for x in initial_state.weights]
            s = [x[n] for x in initial_state.momentum]
            cw = [x[n] for x in initial_state.chunk_weights]
            off = int(initial_state.offset[n])
        o, w, s, cw, off = run_sequence(qf[a:b], kf[a:b], vf[a:b], lrf[a:b], fgf[a:b], mof[a:b],
                                        w, s, cw, off, chunk_size=chunk_size, read=read, **mem)
        outs.append(o)
        ws.append(w)
        ss.append(s)
        cws.append(cw if off > 0 else w)
        offs.append(off)
    o = torch.cat(outs).reshape(B, T, H, D)
    stack = lambda per_seq: tuple(torch.stack([x[i] for x in per_seq])  # noqa: E731
                                  for i in range(len(weights)))
    return o, (stack(ws), stack(ss), stack(cws), torch.tensor(offs))
