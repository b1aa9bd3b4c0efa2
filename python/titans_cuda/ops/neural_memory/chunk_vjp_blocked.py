"""The adjoint of one depth-2 chunk as the fused backward kernel will compute it: the hidden axis
in blocks of ``block`` columns, a (sequence, head) spread over ``split`` CTAs of a cluster, CTA r
owning the blocks b with b % split == r (as the forward kernel does, chunked_kernel.cuh).

Every per-block step below reads only its block's slices of W0, S0, Wg (layer 1 columns, layer
2 rows), of the state cotangents W̄', S̄', and chunk-wide matrices every CTA holds (q, k, the
gates, dz2, z̄2, ...). What needs the whole hidden axis is a per-CTA partial sum, added over the
CTAs in rank order at four synchronisation points (the kernel's cluster sums over DSMEM):

  sync 1  fk                                -> keys' head, E, dz2
  sync 2  z2                                -> o's head backward: z̄2
  sync 3  dz̄2                               -> LayerNorm double backward: f̄, Ē, v̄
  sync 4  q̄, k̄, Ḡ, the last rows of Ḡ / N̄,  -> the gates' adjoint (reverse-mode through the
          β̄, c̄, and <W0, W̄'>, <S0, W̄'>, <S0, S̄'>    forward's column recurrences, O(C^2):
                                                     chunk_vjp.gates_vjp_recurrences)

Passes over a CTA's blocks:
  A  keys forward: zk1 = k Wg1_b, hk1 = phi(zk1); fk += hk1 Wg2_b
  B  errors u = dz2 Wg2_b^T, dz1 = u phi'(zk1); the read's recompute: z1, h1 = phi(z1),
     z2 += beta h1 W0_2b + c h1 S0_2b - (G * h1 hk1^T) dz2
  C  state cotangents of the block, the read's adjoint (layer 2 then 1), the keys' errors'
     second-order adjoint; keeps hk̄1 and zk̄1 of the block for D
  D  the keys' forward adjoint: W̄g2_b += hk1^T f̄, zk̄1 += (hk̄1 + f̄ Wg2_b^T) phi'(zk1),
     W̄g1_b = k^T zk̄1, k̄ += zk̄1 Wg1_b^T
The block's W̄0, S̄0, W̄g come out of C and D whole: no sum crosses the cluster for them.

Read "chunk" (o = M_Wg(q)) is the same walk: the read goes through Wg's blocks in place of
W0's with the row scales (beta, c) = (1, 0), its couplings to G (A1 = G * (q k^T), the P term,
their parts of Ḡ and the row sums beta-bar, c-bar) multiplied by rg = 0, and its cotangent goes
to W̄g. The kernel takes this walk for every call: past chunk 0 W̄g and W̄0 are one buffer, and
in chunk 0 (where an open chunk's Wg != W0) it moves the read's W-part from W̄ to W̄g (wg0).

It computes what chunk_vjp.chunk_step_vjp computes (tested equal in float64,
tests/test_chunk_vjp.py); nothing calls it on the library's paths.
"""
from __future__ import annotations

import torch

from ..activations import activate, activate_grad
from ..memory_mlp.reference import output_head
from .chunk_vjp import _Gates, _head_backward, _ln_double_backward, _ln_j, _param_shape, _t
from .chunk_vjp import activate_grad2, gates_vjp_recurrences


def _rank_sum(parts):
    """The cluster sum: partials added in rank order (every CTA gets the same bits)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def chunk_step_vjp_blocked(q, k, v, lr, decay, eta, active, w0, s0, wg, o_bar, w_bar, s_bar, *,
                           mlp, read, block, split):
    """chunk_vjp.chunk_step_vjp for depth 2, organised per hidden block and CTA (module doc).
    Arguments and result as chunk_step_vjp's; ``block`` divides the hidden width, ``split``
    CTAs (1 <= split <= hidden / block)."""
    if len(w0) != 2:
        raise ValueError("the blocked adjoint is for depth 2")
    hidden = w0[0].shape[-1]
    n_blocks = hidden // block
    if hidden % block or not 1 <= split <= n_blocks:
        raise ValueError(f"block={block} must divide hidden={hidden}, 1 <= split <= blocks")
    act = mlp["activation"]
    head = dict(residual=mlp["residual"], ln_weight=mlp["ln_weight"], ln_bias=mlp["ln_bias"],
                ln_eps=mlp["ln_eps"])
    ln = mlp["ln_weight"] is not None
    owned = [[b for b in range(n_blocks) if b % split == r] for r in range(split)]

    def col(x, b):  # layer-1 matrices [D, hidden]: the block's columns
        return x[..., :, b * block:(b + 1) * block]

    def row(x, b):  # layer-2 matrices [hidden, D]: the block's rows
        return x[..., b * block:(b + 1) * block, :]

    gates = _Gates(lr, decay, eta, active)
    G, bcol, ccol = gates.g_mat, gates.beta.unsqueeze(-1), gates.c.unsqueeze(-1)
    g_last, n_last = gates.g_mat[..., -1, :, None], gates.n_mat[..., -1, :, None]
    beta_c, c_c = gates.beta[..., -1, None, None], gates.c[..., -1, None, None]
    m_c = gates.m[..., -1, None, None]
    # read "chunk": the read through Wg, row scales (1, 0), no couplings to G (module doc)
    token = read == "token"
    rg = 1.0 if token else 0.0
    if not token:
        bcol, ccol = torch.ones_like(bcol), torch.zeros_like(ccol)
    g_read = G * rg  # G where the read's own terms use it
    wr = w0 if token else wg  # the read's weights
    grads = {"ln_weight": torch.zeros_like(q) if ln else None,
             "ln_bias": torch.zeros_like(q) if ln and mlp["ln_bias"] is not None else None}
    kept = {}  # per block: what later passes reuse (the kernel recomputes or keeps these)

    def zeros_parts(like):
        return [torch.zeros_like(like) for _ in range(split)]

    # ---- pass A: keys forward -> sync 1 ----
    fk_p = zeros_parts(q)
    for r in range(split):
        for b in owned[r]:
            zk1 = torch.matmul(k, col(wg[0], b))
            hk1 = activate(zk1, act)
            fk_p[r] = fk_p[r] + torch.matmul(hk1, row(wg[1], b))
            kept[b] = dict(zk1=zk1, hk1=hk1)
    fk = _rank_sum(fk_p)
    yk, xhat_k, rstd_k = output_head(fk, k, **head)
    e = 2.0 * (yk - v)
    dz2 = _ln_j(e * mlp["ln_weight"], xhat_k, rstd_k) if ln else e

    # ---- pass B: layer-1 errors; the read's recompute -> sync 2 ----
    a1 = torch.matmul(q, _t(k))
    ga1 = g_read * a1
    z2_p = zeros_parts(q)
    for r in range(split):
        for b in owned[r]:
            kb = kept[b]
            u = torch.matmul(dz2, _t(row(wg[1], b)))
            dz1 = u * activate_grad(kb["zk1"], act)
            kb.update(u=u, dz1=dz1)
            z1 = (bcol * torch.matmul(q, col(wr[0], b)) + ccol * torch.matmul(q, col(s0[0], b))
                  - torch.matmul(ga1, dz1))
            h1 = activate(z1, act)
            a2 = torch.matmul(h1, _t(kb["hk1"]))
            z2_p[r] = (z2_p[r] + bcol * torch.matmul(h1, row(wr[1], b))
                       + ccol * torch.matmul(h1, row(s0[1], b)) - torch.matmul(g_read * a2, dz2))
            kb.update(z1=z1, h1=h1, a2=a2)
    _, xhat_o, rstd_o = output_head(_rank_sum(z2_p), q, **head)
    z2_bar = _head_backward(o_bar, xhat_o, rstd_o, mlp, grads)
    mm2 = -torch.matmul(z2_bar, _t(dz2))
    a2_bar = mm2 * g_read

    # ---- pass C: state, read, keys' second order -> sync 3 ----
    rows_c = gates.c  # [.., C]
    q_p, k_p, dz2b_p, g_p = zeros_parts(q), zeros_parts(q), zeros_parts(q), zeros_parts(G)
    gl_p, nl_p, bb_p, cb_p = (zeros_parts(rows_c) for _ in range(4))
    sc_p = [torch.zeros(3, *rows_c.shape[:-1], dtype=q.dtype, device=q.device)
            for _ in range(split)]
    out = {}  # per block: (w0̄, s0̄, wḡ) of layer 1 (columns) and layer 2 (rows)

    def frob(a, b_):
        return (a * b_).sum((-1, -2))

    for r in range(split):
        for b in owned[r]:
            kb = kept[b]
            hk1, dz1 = kb["hk1"], kb["dz1"]
            # state, layer 1 (columns b of W1, S1)
            wb1, sb1 = col(w_bar[0], b), col(s_bar[0], b)
            hw, hs = torch.matmul(k, wb1), torch.matmul(k, sb1)
            dz1_bar = -g_last * hw - n_last * hs
            k_p[r] = k_p[r] - torch.matmul(g_last * dz1, _t(wb1)) - torch.matmul(
                n_last * dz1, _t(sb1))
            gl_p[r] = gl_p[r] - (hw * dz1).sum(-1)
            nl_p[r] = nl_p[r] - (hs * dz1).sum(-1)
            w0b1, s0b1 = beta_c * wb1, c_c * wb1 + m_c * sb1
            sc_p[r] = sc_p[r] + torch.stack([frob(col(w0[0], b), wb1), frob(col(s0[0], b), wb1),
                                             frob(col(s0[0], b), sb1)])
            # state, layer 2 (rows b of W2, S2)
            wb2, sb2 = row(w_bar[1], b), row(s_bar[1], b)
            hw, hs = torch.matmul(hk1, wb2), torch.matmul(hk1, sb2)
            dz2b_p[r] = dz2b_p[r] - g_last * hw - n_last * hs
            hk1_bar = -torch.matmul(g_last * dz2, _t(wb2)) - torch.matmul(n_last * dz2, _t(sb2))
            gl_p[r] = gl_p[r] - (hw * dz2).sum(-1)
            nl_p[r] = nl_p[r] - (hs * dz2).sum(-1)
            w0b2, s0b2 = beta_c * wb2, c_c * wb2 + m_c * sb2
            sc_p[r] = sc_p[r] + torch.stack([frob(row(w0[1], b), wb2), frob(row(s0[1], b), wb2),
                                             frob(row(s0[1], b), sb2)])
            wgb1, wgb2 = torch.zeros_like(wb1), torch.zeros_like(wb2)
            h1, a2 = kb["h1"], kb["a2"]
            # read, layer 2 (its W-part goes to W̄0, or to W̄g for read "chunk")
            bb_p[r] = bb_p[r] + rg * (z2_bar * torch.matmul(h1, row(wr[1], b))).sum(-1)
            cb_p[r] = cb_p[r] + rg * (z2_bar * torch.matmul(h1, row(s0[1], b))).sum(-1)
            rw2 = torch.matmul(_t(h1), bcol * z2_bar)
            w0b2, wgb2 = (w0b2 + rw2, wgb2) if token else (w0b2, wgb2 + rw2)
            s0b2 = s0b2 + torch.matmul(_t(h1), ccol * z2_bar)
            g_p[r] = g_p[r] + rg * mm2 * a2
            dz2b_p[r] = dz2b_p[r] - torch.matmul(_t(g_read * a2), z2_bar)
            h1_bar = (bcol * torch.matmul(z2_bar, _t(row(wr[1], b)))
                      + ccol * torch.matmul(z2_bar, _t(row(s0[1], b)))
                      + torch.matmul(a2_bar, hk1))
            hk1_bar = hk1_bar + torch.matmul(_t(a2_bar), h1)
            z1_bar = h1_bar * activate_grad(kb["z1"], act)
            # read, layer 1
            bb_p[r] = bb_p[r] + rg * (z1_bar * torch.matmul(q, col(wr[0], b))).sum(-1)
            cb_p[r] = cb_p[r] + rg * (z1_bar * torch.matmul(q, col(s0[0], b))).sum(-1)
            rw1 = torch.matmul(_t(q), bcol * z1_bar)
            w0b1, wgb1 = (w0b1 + rw1, wgb1) if token else (w0b1, wgb1 + rw1)
            s0b1 = s0b1 + torch.matmul(_t(q), ccol * z1_bar)
            mm1 = -torch.matmul(z1_bar, _t(dz1))  # this block's part of the C x C product
            g_p[r] = g_p[r] + rg * mm1 * a1
            a1_bar = mm1 * g_read
            dz1_bar = dz1_bar - torch.matmul(_t(ga1), z1_bar)
            q_p[r] = (q_p[r] + bcol * torch.matmul(z1_bar, _t(col(wr[0], b)))
                      + ccol * torch.matmul(z1_bar, _t(col(s0[0], b)))
                      + torch.matmul(a1_bar, k))
            k_p[r] = k_p[r] + torch.matmul(_t(a1_bar), q)
            # the keys' errors, second order: dz1 = (dz2 Wg2^T) phi'(zk1)
            u_bar = dz1_bar * activate_grad(kb["zk1"], act)
            zk1_bar = dz1_bar * kb["u"] * activate_grad2(kb["zk1"], act)
            dz2b_p[r] = dz2b_p[r] + torch.matmul(u_bar, row(wg[1], b))
            wgb2 = wgb2 + torch.matmul(_t(u_bar), dz2)
            kb.update(hk1_bar=hk1_bar, zk1_bar=zk1_bar)
            out[b] = [w0b1, s0b1, wgb1, w0b2, s0b2, wgb2]

    # ---- sync 3: LayerNorm double backward, the keys' head ----
    f_bar, e_bar = _ln_double_backward(_rank_sum(dz2b_p), e, dz2, xhat_k, rstd_k, mlp, grads)
    yk_bar = 2.0 * e_bar
    f_bar = f_bar + _head_backward(yk_bar, xhat_k, rstd_k, mlp, grads)

    # ---- pass D: the keys' forward adjoint -> sync 4 ----
    for r in range(split):
        for b in owned[r]:
            kb, ob = kept[b], out[b]
            ob[5] = ob[5] + torch.matmul(_t(kb["hk1"]), f_bar)
            h_bar = kb["hk1_bar"] + torch.matmul(f_bar, _t(row(wg[1], b)))
            zk1_bar = kb["zk1_bar"] + h_bar * activate_grad(kb["zk1"], act)
            ob[2] = ob[2] + torch.matmul(_t(k), zk1_bar)
            k_p[r] = k_p[r] + torch.matmul(zk1_bar, _t(col(wg[0], b)))

    # ---- sync 4: the gates ----
    q_bar = _rank_sum(q_p) + (o_bar if mlp["residual"] else 0.0)
    k_bar = _rank_sum(k_p) + (yk_bar if mlp["residual"] else 0.0)
    sc = _rank_sum(sc_p)
    g_bar = _rank_sum(g_p)
    g_bar[..., -1, :] += _rank_sum(gl_p)
    n_bar = torch.zeros_like(G)
    n_bar[..., -1, :] = _rank_sum(nl_p)
    beta_bar, c_bar = _rank_sum(bb_p), _rank_sum(cb_p)
    beta_bar[..., -1] += sc[0]
    c_bar[..., -1] += sc[1]
    m_bar = torch.zeros_like(beta_bar)
    m_bar[..., -1] = sc[2]
    lr_bar, decay_bar, eta_bar = gates_vjp_recurrences(lr, decay, eta, active, g_bar, n_bar,
                                                       c_bar, beta_bar, m_bar)

    def assemble(i, layer):
        return torch.cat([out[b][i] for b in range(n_blocks)], dim=-1 if layer == 0 else -2)
    return {"q": q_bar, "k": k_bar, "v": -2.0 * e_bar, "lr": lr_bar, "decay": decay_bar,
            "eta": eta_bar, "w0": [assemble(0, 0), assemble(3, 1)],
            "s0": [assemble(1, 0), assemble(4, 1)], "wg": [assemble(2, 0), assemble(5, 1)],
            "ln_weight": _param_shape(grads["ln_weight"], mlp),
            "ln_bias": _param_shape(grads["ln_bias"], mlp)}
