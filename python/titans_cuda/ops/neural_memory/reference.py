"""Pure-PyTorch chunked reference of neural_memory (SPEC §2-4): the dual form.

Vectorised over sequences and heads, it loops over chunks only. Sequences (batch rows, or the
pieces of a cu_seqlens pack) are laid into a padded timeline where token t of sequence n sits at
position offset_n + t, so that every sequence's chunk boundaries fall on multiples of C.
Positions outside [offset_n, offset_n + len_n) are inactive: their gates are neutral
(lr = 0, forget = 0, momentum = 1) and they never add momentum to the weights.

Per chunk (token i = 0..C-1 of the slot, W0/S0 the state before it, Wg the weights at which the
open chunk takes its gradients, act_i in {0, 1}):

  1. gates        Pm[t,i] = prod_{i<k<=t} eta_k,  Pb[t,i] = prod_{i<k<=t} (1 - alpha_k)   (t >= i)
                  m_t = prod_{k<=t} eta_k,  beta_t = prod_{k<=t} (1 - alpha_k)
                  N[t,j] = lr_j Pm[t,j]                                 (n_{t,j} of SPEC §2)
                  G = (Pb * act) @ N,  c = (Pb * act) @ m
                  All products are running products (cumprod); no ratio is ever formed.
  2. keys         forward of k at Wg, errors dz^l = dl/dz^l: u^l_j = h^{l-1}_j^T dz^l_j
  3. read         "token": z^l_t = beta_t h_t W0^l + c_t h_t S0^l - sum_j G[t,j] (h_t . hk_j) dz^l_j
                  layer by layer (h = the query's layer input at W_t); "chunk": M_{Wg}(q)
  4. state        W = beta_C W0 + c_C S0 - hk^T (G[C,:] * dz),  S = m_C S0 - hk^T (N[C,:] * dz)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ...state import MemoryState, own_offset
from ..activations import activate
from ..memory_mlp.reference import compute_dtype, forward_pass, loss_errors, output_head


def segment_products(a: torch.Tensor) -> torch.Tensor:
    """a [..., C] -> P [..., C, C] with P[t, i] = prod_{i<k<=t} a_k for t >= i, 0 above the
    diagonal. A masked cumulative product: exact when some a_k are 0, no division."""
    C = a.shape[-1]
    upper = torch.ones(C, C, dtype=torch.bool, device=a.device).triu(1)  # [i, k]: k > i
    grid = torch.where(upper, a.unsqueeze(-2), torch.ones_like(a).unsqueeze(-2))  # [..., i, k]
    prods = torch.cumprod(grid, dim=-1)  # [..., i, t] = prod_{i<k<=t} a_k (t >= i)
    return prods.transpose(-1, -2).tril()


def chunk_step(q, k, v, lr, decay, eta, active, w0, s0, wg, *, mlp, read):
    """One chunk for all sequences and heads. q, k, v [N, H, C, D]; lr, decay (= 1 - alpha),
    eta [N, H, C]; active [N, 1, C]; w0, s0, wg: per layer [N, H, d_in, d_out].
    Returns (o [N, H, C, D], w_new, s_new)."""
    # 1. gates
    p_eta = segment_products(eta)
    p_decay = segment_products(decay) * active.unsqueeze(-2)
    m = torch.cumprod(eta, dim=-1)
    beta = torch.cumprod(decay, dim=-1)
    n_mat = p_eta * lr.unsqueeze(-2)
    g_mat = torch.matmul(p_decay, n_mat)
    c = torch.matmul(p_decay, m.unsqueeze(-1)).squeeze(-1)
    # 2. keys: errors at the gradient weights
    cache, dz = loss_errors(k, v, wg, **mlp)
    # 3. read
    if read == "chunk":
        o, _ = forward_pass(q, wg, **mlp)
    else:
        h = q
        n_layers = len(w0)
        for layer in range(n_layers):
            hk = cache.h[layer]
            z = (beta.unsqueeze(-1) * torch.matmul(h, w0[layer])
                 + c.unsqueeze(-1) * torch.matmul(h, s0[layer])
                 - torch.matmul(g_mat * torch.matmul(h, hk.transpose(-1, -2)), dz[layer]))
            h = activate(z, mlp["activation"]) if layer < n_layers - 1 else z
        o, _, _ = output_head(h, q, residual=mlp["residual"], ln_weight=mlp["ln_weight"],
                              ln_bias=mlp["ln_bias"], ln_eps=mlp["ln_eps"])
    # 4. state after the chunk's last slot (inactive trailing slots leave it unchanged)
    beta_end = beta[..., -1, None, None]
    c_end = c[..., -1, None, None]
    m_end = m[..., -1, None, None]
    g_end = g_mat[..., -1, :].unsqueeze(-1)  # [N, H, C, 1]
    n_end = n_mat[..., -1, :].unsqueeze(-1)
    w_new, s_new = [], []
    for layer in range(len(w0)):
        hk_t = cache.h[layer].transpose(-1, -2)
        w_new.append(beta_end * w0[layer] + c_end * s0[layer]
                     - torch.matmul(hk_t, g_end * dz[layer]))
        s_new.append(m_end * s0[layer] - torch.matmul(hk_t, n_end * dz[layer]))
    return o, w_new, s_new


class _DenseTimeline:
    """B rows of T tokens, every row starting a fresh chunk: pure reshapes, no index tensors
    (so fake tensors and torch.compile(fullgraph=True) trace it)."""

    def __init__(self, B, T, C, device):
        self.n_seq, self.T, self.C = B, T, C
        self.n_chunks = -(-T // C)
        pos = torch.arange(self.n_chunks * C, device=device)
        self.active = (pos < T).view(1, 1, self.n_chunks, C)
        last = (T - 1) // C if T > 0 else -1
        self.is_last_chunk = lambda j: j == last  # noqa: E731 - the same for every row
        self.final_offset = torch.full((B,), T % C, dtype=torch.long, device=device)

    def lay_out(self, x, fill, dtype):
        """[B, T, H, *F] -> [B, H, NC, C, *F], padded with ``fill``."""
        x = x.to(dtype)
        pad = self.n_chunks * self.C - self.T
        if pad:
            x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], dim=1)
        x = x.reshape(x.shape[0], self.n_chunks, self.C, *x.shape[2:])
        return x.movedim(3, 1)

    def unlay(self, o_pad):
        """[B, H, NC, C, D] -> [B, T, H, D]."""
        B, H, _, _, D = o_pad.shape
        return o_pad.movedim(1, 3).reshape(B, self.n_chunks * self.C, H, D)[:, :self.T]


class _PackedTimeline:
    """General sequences: token t of sequence n sits at position offset_n + t (gather/scatter
    through index tensors built on the host)."""

    def __init__(self, starts, lengths, offsets, C, total, device):
        self.n_seq, self.C, self.total = starts.shape[0], C, total
        ends = offsets + lengths
        self.n_chunks = -(-int(ends.max()) // C) if self.n_seq else 0
        pos = torch.arange(self.n_chunks * C).unsqueeze(0)
        rel = pos - offsets.unsqueeze(1)
        active = (rel >= 0) & (rel < lengths.unsqueeze(1))  # [N, NC*C]
        self.active = active.view(self.n_seq, 1, self.n_chunks, C).to(device)
        self.gather = torch.where(active, starts.unsqueeze(1) + rel,
                                  torch.full_like(rel, total)).to(device)
        seq_of = torch.repeat_interleave(torch.arange(self.n_seq), lengths)
        tok_in_seq = torch.arange(total) - starts[seq_of]
        self.scatter = (seq_of * self.n_chunks * C + offsets[seq_of] + tok_in_seq).to(device)
        # chunk index holding each sequence's last token (-1 when it has none)
        last = torch.where(lengths > 0, (ends - 1) // C, torch.full_like(lengths, -1))
        last = last.to(device).view(self.n_seq, 1, 1, 1)
        self.is_last_chunk = lambda j: last == j  # noqa: E731
        self.final_offset = (ends % C).to(device)

    def lay_out(self, x, fill, dtype):
        """[B, T, H, *F] packed -> [N, H, NC, C, *F], inactive slots = ``fill``."""
        flat = x.reshape(self.total, *x.shape[2:]).to(dtype)
        flat = torch.cat([flat, flat.new_full((1, *flat.shape[1:]), fill)], dim=0)
        out = flat[self.gather].reshape(self.n_seq, self.n_chunks, self.C, *flat.shape[1:])
        return out.movedim(3, 1)

    def unlay(self, o_pad):
        """[N, H, NC, C, D] -> [total, H, D] in packed token order."""
        N, H, _, _, D = o_pad.shape
        return o_pad.movedim(1, 3).reshape(N * self.n_chunks * self.C, H, D)[self.scatter]


@dataclasses.dataclass
class _Prepared:
    """Everything the chunk loop needs, laid out on the padded timeline (see _prepare). A
    dataclass, so that torch.compile traces it (dynamo 2.11 does not trace __dict__.update)."""
    B: int
    T: int
    H: int
    D: int
    dtype: torch.dtype
    timeline: Any
    n_seq: int
    n_chunks: Any
    w: Any
    s: Any
    wg0: Any
    open_chunk: Any
    qt: Tensor
    kt: Tensor
    vt: Tensor
    lr_t: Tensor
    decay_t: Tensor
    eta_t: Tensor
    act_t: Any
    mlp: Any


def _prepare(q, k, v, lr, forget, momentum, weights, *, chunk_size, activation, residual,
             ln_weight, ln_bias, ln_eps, initial_state, cu_seqlens):
    """The timeline, the initial W, S and gradient weights wg0 per sequence, and the inputs
    laid out as [N, H, NC, C, ...] (also used by chunk_vjp.sequence_vjp)."""
    B, T, H, D = q.shape
    device = q.device
    dtype = compute_dtype(q, k, v, *weights)
    C = chunk_size

    # sequences and their place in the padded timeline
    if cu_seqlens is None and initial_state is None:
        timeline = _DenseTimeline(B, T, C, device)
    else:
        if cu_seqlens is None:
            starts = torch.arange(B, dtype=torch.long) * T
            lengths = torch.full((B,), T, dtype=torch.long)
        else:
            cu = cu_seqlens.to("cpu", torch.long)
            starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        n_seq = starts.shape[0]
        offsets = torch.zeros(n_seq, dtype=torch.long) if initial_state is None \
            else initial_state.offset.to("cpu", torch.long)
        timeline = _PackedTimeline(starts, lengths, offsets, C, B * T, device)
    n_seq, n_chunks = timeline.n_seq, timeline.n_chunks

    if initial_state is None:
        w = [wt.to(dtype).unsqueeze(0).expand(n_seq, *wt.shape) for wt in weights]
        s = [torch.zeros(n_seq, *wt.shape, dtype=dtype, device=device) for wt in weights]
        wg0 = w
        open_chunk = None
    else:
        w = [wt.to(dtype) for wt in initial_state.weights]
        s = [st.to(dtype) for st in initial_state.momentum]
        open_chunk = (initial_state.offset > 0).view(n_seq, 1, 1, 1)
        # a chunk still open continues at its own weights; offset 0 starts a new chunk at W
        wg0 = [torch.where(open_chunk, cw.to(dtype), wt)
               for cw, wt in zip(initial_state.chunk_weights, w)]

    qt, kt, vt = (timeline.lay_out(x, 0.0, dtype) for x in (q, k, v))
    lr_t = timeline.lay_out(lr, 0.0, dtype)
    decay_t = 1.0 - timeline.lay_out(forget, 0.0, dtype)
    eta_t = timeline.lay_out(momentum, 1.0, dtype)
    act_t = timeline.active.to(dtype)

    def ln_shape(p):
        return None if p is None else p.to(dtype).reshape(H, 1, D)
    mlp = dict(activation=activation, residual=residual, ln_weight=ln_shape(ln_weight),
               ln_bias=ln_shape(ln_bias), ln_eps=ln_eps)
    return _Prepared(B=B, T=T, H=H, D=D, dtype=dtype, timeline=timeline, n_seq=n_seq,
                     n_chunks=n_chunks, w=w, s=s, wg0=wg0, open_chunk=open_chunk, qt=qt, kt=kt,
                     vt=vt, lr_t=lr_t, decay_t=decay_t, eta_t=eta_t, act_t=act_t, mlp=mlp)


def neural_memory(q, k, v, lr, forget, momentum, weights, *, chunk_size=64, activation="silu",
                  residual=False, ln_weight=None, ln_bias=None, ln_eps=1e-6, read="token",
                  initial_state=None, output_final_state=False, cu_seqlens=None):
    """Reference of titans_cuda.neural_memory (arguments already validated)."""
    P = _prepare(q, k, v, lr, forget, momentum, weights, chunk_size=chunk_size,
                 activation=activation, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                 ln_eps=ln_eps, initial_state=initial_state, cu_seqlens=cu_seqlens)
    B, T, H, D, dtype, timeline = P.B, P.T, P.H, P.D, P.dtype, P.timeline
    n_seq, n_chunks, w, s, wg0, mlp = P.n_seq, P.n_chunks, P.w, P.s, P.wg0, P.mlp
    qt, kt, vt, lr_t, decay_t, eta_t, act_t = P.qt, P.kt, P.vt, P.lr_t, P.decay_t, P.eta_t, P.act_t

    cw = wg0  # the weights of each sequence's open chunk, for the final state
    outs = []
    for j in range(n_chunks):
        wg = wg0 if j == 0 else w
        o, w, s = chunk_step(qt[:, :, j], kt[:, :, j], vt[:, :, j], lr_t[:, :, j],
                             decay_t[:, :, j], eta_t[:, :, j], act_t[:, :, j], w, s, wg,
                             mlp=mlp, read=read)
        outs.append(o)
        if output_final_state:
            is_last = timeline.is_last_chunk(j)
            if isinstance(is_last, torch.Tensor):  # per sequence (packed timeline)
                cw = [torch.where(is_last, g, prev) for g, prev in zip(wg, cw)]
            else:  # the same for every row: a bool (or a SymBool when traced with dynamic T)
                cw = wg if is_last else cw

    if n_chunks:
        o = timeline.unlay(torch.stack(outs, dim=2)).reshape(B, T, H, D)
    else:
        o = q.new_zeros(B, T, H, D, dtype=dtype)
    o = o.to(q.dtype)

    if not output_final_state:
        return o, None
    final_offset = timeline.final_offset
    if not torch.compiler.is_compiling():  # valid by construction: check_state trusts it
        own_offset(final_offset, chunk_size)
    still_open = (final_offset > 0).view(n_seq, 1, 1, 1)
    cw = [torch.where(still_open, c_, w_) for c_, w_ in zip(cw, w)]
    w = [wt.contiguous() for wt in w]  # no stride-0 batch views escape into the state
    return o, MemoryState(tuple(w), tuple(s), tuple(cw), final_offset)
