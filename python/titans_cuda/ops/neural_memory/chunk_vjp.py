"""The adjoint of one chunk of the dual form (``reference.chunk_step``), written out by hand.

This is the blueprint of the fused backward kernel (issue 4): every cotangent below is a matrix
product, a row reduction or an elementwise map over the chunk, in the order a kernel walking the
chunks in reverse would compute them, with no ratio of gate products anywhere (gradients of the
segment products use prefix x suffix products, exact when a gate is 0). ``sequence_vjp`` is
the outer loop: chunks in reverse, the state's cotangents carried, the final chunk weights'
cotangent owed to each sequence's last chunk, the first chunk's gradient weights routed to the
initial state's weights or chunk weights. Both are tested against autograd through the
reference in float64 (tests/test_chunk_vjp.py). Nothing calls them on the library's paths yet:
``neural_memory``'s backward is still autograd through the reference.

Notation as in reference.py (one chunk, leading dims [N, H], x̄ = dL/dx):

  forward   gates   Pm, Pb (x act), m, beta, N = Pm lr, G = Pb N, c = Pb m
            keys    hk_0 = k, zk_l = hk_l Wg_l, hk_{l+1} = phi(zk_l), f = zk_{L-1},
                    y = [k +] [LN](f), E = 2 (y - v), dz_{L-1} = LNB(f, E),
                    dz_l = (dz_{l+1} Wg_{l+1}^T) phi'(zk_l)
            read    h_0 = q, A_l = h_l hk_l^T, z_l = beta h_l W0_l + c h_l S0_l - (G A_l) dz_l,
                    h_{l+1} = phi(z_l), o = [q +] [LN](z_{L-1})      ("chunk": o = M_Wg(q))
            state   W_l' = beta_C W0_l + c_C S0_l - hk_l^T (g dz_l),
                    S_l' = m_C S0_l - hk_l^T (n dz_l)               (g, n: last rows of G, N)
  backward  state -> read (top layer down) -> keys' errors (bottom layer up, second order) ->
            LN double backward -> keys' forward (top down) -> gates

LNB(f, E) = J (gamma E) with J(x) = r (x - mean(x) - xhat mean(x xhat)) (symmetric), and for a
cotangent e of LNB: Ē = gamma J(e), gamma-bar += E J(e), and
f̄ = -(r / D) (xhat <e, dz> + dz <e, xhat>) - r s J(e), s = mean(gamma E xhat).
"""
from __future__ import annotations

import math

import torch

from ..activations import activate, activate_grad
from ..memory_mlp.reference import forward_pass, output_head
from . import reference as ref
from .reference import segment_products

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activate_grad2(z: torch.Tensor, name: str) -> torch.Tensor:
    """phi''(z): silu s (1 - s) (2 + z (1 - 2 s)); gelu pdf(z) (2 - z^2)."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return pdf * (2.0 - z * z)


def _t(x):
    return x.transpose(-1, -2)


def segment_products_vjp(p: torch.Tensor, p_bar: torch.Tensor) -> torch.Tensor:
    """ā for P = segment_products(a), from P itself: dP[t,i]/da_k = P[k-1,i] P[t,k] for
    i < k <= t (prefix times suffix, no division), so ā_k = sum_t P[t,k] (P̄ Q)[t,k] with
    Q[i,k] = P[k-1,i]."""
    q = torch.zeros_like(p)
    q[..., :, 1:] = _t(p[..., :-1, :])
    return (p * torch.matmul(p_bar.tril(), q)).sum(-2)


def cumprod_vjp(p: torch.Tensor, prod: torch.Tensor, prod_bar: torch.Tensor) -> torch.Tensor:
    """ā for prod = cumprod(a) (p = segment_products(a)): ā_k = prod_{k-1} sum_t prod̄_t P[t,k]."""
    prev = torch.cat([torch.ones_like(prod[..., :1]), prod[..., :-1]], dim=-1)
    return prev * torch.matmul(prod_bar.unsqueeze(-2), p).squeeze(-2)


def _ln_j(x, xhat, rstd):
    """J(x) = r (x - mean(x) - xhat mean(x xhat)): the LayerNorm backward without gamma."""
    return rstd * (x - x.mean(-1, keepdim=True) - xhat * (x * xhat).mean(-1, keepdim=True))


def _head_backward(y_bar, xhat, rstd, mlp, grads):
    """ȳ of y = [x +] [LN](f) -> f̄ (and the LN parameters' cotangents into grads)."""
    if mlp["ln_weight"] is None:
        return y_bar
    grads["ln_weight"] = grads["ln_weight"] + (y_bar * xhat)
    if mlp["ln_bias"] is not None:
        grads["ln_bias"] = grads["ln_bias"] + y_bar
    return _ln_j(y_bar * mlp["ln_weight"], xhat, rstd)


def _mlp_backward(f_bar, h, z, weights, activation, wg_bar):
    """Back through z_l = h_l W_l, h_{l+1} = phi(z_l) from f̄ = z̄_{L-1}; adds W̄ into wg_bar,
    returns h̄_0."""
    z_bar = f_bar
    for layer in range(len(weights) - 1, -1, -1):
        wg_bar[layer] = wg_bar[layer] + torch.matmul(_t(h[layer]), z_bar)
        h_bar = torch.matmul(z_bar, _t(weights[layer]))
        if layer == 0:
            return h_bar
        z_bar = h_bar * activate_grad(z[layer - 1], activation)


class _Gates:
    """The chunk's gate products (reference.chunk_step, step 1), kept for their adjoints."""

    def __init__(self, lr, decay, eta, active):
        self.lr, self.active = lr, active
        self.p_eta = segment_products(eta)
        self.p_dec = segment_products(decay)
        self.pb = self.p_dec * active.unsqueeze(-2)
        self.m = torch.cumprod(eta, dim=-1)
        self.beta = torch.cumprod(decay, dim=-1)
        self.n_mat = self.p_eta * lr.unsqueeze(-2)
        self.g_mat = torch.matmul(self.pb, self.n_mat)
        self.c = torch.matmul(self.pb, self.m.unsqueeze(-1)).squeeze(-1)

    def vjp(self, g_bar, n_bar, c_bar, beta_bar, m_bar):
        """(lr̄, decaȳ, etā) from the cotangents of G, N, c, beta and m."""
        pb_bar = torch.matmul(g_bar, _t(self.n_mat)) + c_bar.unsqueeze(-1) * self.m.unsqueeze(-2)
        n_bar = n_bar + torch.matmul(_t(self.pb), g_bar)
        m_bar = m_bar + torch.matmul(_t(self.pb), c_bar.unsqueeze(-1)).squeeze(-1)
        pdec_bar = pb_bar * self.active.unsqueeze(-2)
        lr_bar = (n_bar * self.p_eta).sum(-2)
        eta_bar = (segment_products_vjp(self.p_eta, n_bar * self.lr.unsqueeze(-2))
                   + cumprod_vjp(self.p_eta, self.m, m_bar))
        decay_bar = (segment_products_vjp(self.p_dec, pdec_bar)
                     + cumprod_vjp(self.p_dec, self.beta, beta_bar))
        return lr_bar, decay_bar, eta_bar


def gates_vjp_recurrences(lr, decay, eta, active, g_bar, n_bar, c_bar, beta_bar, m_bar):
    """_Gates.vjp as a kernel runs it: reverse-mode through the forward kernel's own gate
    recurrences, one thread per column j of G and N plus one for the scalars, O(C^2), no
    division and no C x C x C product. Forward (t > j): N[j,j] = theta_j, N[t,j] = eta_t
    N[t-1,j]; G[j,j] = act_j theta_j, G[t,j] = a_t G[t-1,j] + act_t N[t,j]; m_t = eta_t
    m_{t-1}, beta_t = a_t beta_{t-1}, c_t = a_t c_{t-1} + act_t m_t. Reverse, t = C-1 .. 0:
    Ĝ_t = Ḡ[t] + a_{t+1} Ĝ_{t+1}, N̂_t = N̄[t] + act_t Ĝ_t + eta_{t+1} N̂_{t+1};
    ā_t += Ĝ_t G[t-1], etā_t += N̂_t N[t-1] (summed over the columns, zero where t <= j),
    thetā_j = N̂_j; and the same for c, m, beta. Ḡ, N̄ above the diagonal are ignored (G and N
    are lower triangular). Returns (lr̄, decaȳ, etā) like _Gates.vjp."""
    C = lr.shape[-1]
    act = active.expand_as(lr)
    g_bar, n_bar = g_bar.tril(), n_bar.tril()
    # forward, all columns at once: rows t of N and G (zero above the diagonal)
    n_rows, g_rows = [], []
    n_prev = g_prev = torch.zeros_like(lr)
    for t in range(C):
        onehot = torch.zeros_like(lr)
        onehot[..., t] = 1.0
        n_t = eta[..., t, None] * n_prev + onehot * lr
        g_t = decay[..., t, None] * g_prev + act[..., t, None] * n_t
        n_rows.append(n_t)
        g_rows.append(g_t)
        n_prev, g_prev = n_t, g_t
    zero = torch.zeros_like(lr)
    gh = nh = zero  # Ĝ_{t+1}, N̂_{t+1} per column
    a_bar, e_bar, th_bar = zero.clone(), zero.clone(), zero.clone()
    ch = mh = bh = torch.zeros_like(lr[..., 0])  # ĉ, m̂, beta-hat at t + 1
    m = torch.cumprod(eta, dim=-1)
    beta = torch.cumprod(decay, dim=-1)
    c_prev_all = []
    c = torch.zeros_like(lr[..., 0])
    for t in range(C):
        c_prev_all.append(c)
        c = decay[..., t] * c + act[..., t] * m[..., t]
    for t in range(C - 1, -1, -1):
        a_next = decay[..., t + 1, None] if t + 1 < C else zero[..., :1]
        e_next = eta[..., t + 1, None] if t + 1 < C else zero[..., :1]
        gh = g_bar[..., t, :] + a_next * gh
        nh = n_bar[..., t, :] + act[..., t, None] * gh + e_next * nh
        if t > 0:
            a_bar[..., t] += (gh * g_rows[t - 1]).sum(-1)
            e_bar[..., t] += (nh * n_rows[t - 1]).sum(-1)
        th_bar[..., t] = nh[..., t]
        # the scalars: c_t = a_t c_{t-1} + act_t m_t, m_t = eta_t m_{t-1}, beta_t = a_t beta_{t-1}
        ch = c_bar[..., t] + a_next[..., 0] * ch
        mh = m_bar[..., t] + act[..., t] * ch + e_next[..., 0] * mh
        bh = beta_bar[..., t] + a_next[..., 0] * bh
        m_prev = m[..., t - 1] if t > 0 else torch.ones_like(ch)
        beta_prev = beta[..., t - 1] if t > 0 else torch.ones_like(ch)
        a_bar[..., t] += ch * c_prev_all[t] + bh * beta_prev
        e_bar[..., t] += mh * m_prev
    return th_bar, a_bar, e_bar


def _ln_double_backward(top, e, dz_top, xhat, rstd, mlp, grads):
    """Cotangent `top` of dz_{L-1} = J(gamma E) at f -> (f̄ part, Ē), gamma-bar into grads;
    without LayerNorm dz_{L-1} = E."""
    if mlp["ln_weight"] is None:
        return torch.zeros_like(top), top
    gam = mlp["ln_weight"]
    je = _ln_j(top, xhat, rstd)
    grads["ln_weight"] = grads["ln_weight"] + e * je
    s = (gam * e * xhat).mean(-1, keepdim=True)
    D = top.shape[-1]
    f_bar = -(rstd / D) * (xhat * (top * dz_top).sum(-1, keepdim=True)
                           + dz_top * (top * xhat).sum(-1, keepdim=True)) - rstd * s * je
    return f_bar, gam * je


def _param_shape(g, mlp):
    """A per-row LN parameter cotangent summed to the parameter's broadcast shape."""
    if g is None:
        return None
    shape = mlp["ln_weight"].shape
    dims = [i for i in range(g.dim()) if i >= g.dim() - len(shape) and
            shape[i - g.dim()] == 1 or i < g.dim() - len(shape)]
    return g.sum(dims, keepdim=True).reshape(shape) if dims else g


def chunk_step_vjp(q, k, v, lr, decay, eta, active, w0, s0, wg, o_bar, w_bar, s_bar, *, mlp,
                   read):
    """Cotangents of chunk_step's inputs given those of its outputs (o, w_new, s_new).

    Arguments as chunk_step's, plus o_bar [N, H, C, D] and w_bar, s_bar (per layer, like w0).
    Returns a dict: q, k, v, lr, decay, eta ([..., C(, D)]), w0, s0, wg (lists per layer),
    ln_weight, ln_bias (summed over rows and chunk to the parameters' broadcast shape, or None).
    """
    act_name = mlp["activation"]
    n_layers = len(w0)
    # ---- forward recompute ----
    gates = _Gates(lr, decay, eta, active)
    m, beta, n_mat, g_mat, c = gates.m, gates.beta, gates.n_mat, gates.g_mat, gates.c

    yk, kc = forward_pass(k, wg, activation=act_name, residual=mlp["residual"],
                          ln_weight=mlp["ln_weight"], ln_bias=mlp["ln_bias"],
                          ln_eps=mlp["ln_eps"])
    e = 2.0 * (yk - v)
    ln = mlp["ln_weight"] is not None
    dz = [None] * n_layers
    dz[-1] = _ln_j(e * mlp["ln_weight"], kc.xhat, kc.rstd) if ln else e
    for layer in range(n_layers - 2, -1, -1):
        dz[layer] = (torch.matmul(dz[layer + 1], _t(wg[layer + 1]))
                     * activate_grad(kc.z[layer], act_name))
    hk = kc.h

    grads = {"ln_weight": torch.zeros_like(q) if ln else None,
             "ln_bias": torch.zeros_like(q) if ln and mlp["ln_bias"] is not None else None}
    wg_bar = [torch.zeros_like(w) for w in wg]
    w0_bar = [torch.zeros_like(w) for w in w0]
    s0_bar = [torch.zeros_like(w) for w in s0]
    dz_bar = [torch.zeros_like(d) for d in dz]
    hk_bar = [torch.zeros_like(h) for h in hk]
    g_bar = torch.zeros_like(g_mat)
    n_bar = torch.zeros_like(n_mat)
    c_bar, beta_bar, m_bar = (torch.zeros_like(c) for _ in range(3))
    q_bar = torch.zeros_like(q)

    # ---- state ----
    g_last, n_last = g_mat[..., -1, :], n_mat[..., -1, :]
    for layer in range(n_layers):
        wb, sb = w_bar[layer], s_bar[layer]
        w0_bar[layer] = w0_bar[layer] + beta[..., -1, None, None] * wb
        s0_bar[layer] = s0_bar[layer] + c[..., -1, None, None] * wb + m[..., -1, None, None] * sb
        beta_bar[..., -1] += (w0[layer] * wb).sum((-1, -2))
        c_bar[..., -1] += (s0[layer] * wb).sum((-1, -2))
        m_bar[..., -1] += (s0[layer] * sb).sum((-1, -2))
        hw, hs = torch.matmul(hk[layer], wb), torch.matmul(hk[layer], sb)  # [C, d_out]
        dz_bar[layer] = dz_bar[layer] - g_last.unsqueeze(-1) * hw - n_last.unsqueeze(-1) * hs
        hk_bar[layer] = hk_bar[layer] - torch.matmul(
            g_last.unsqueeze(-1) * dz[layer], _t(wb)) - torch.matmul(
            n_last.unsqueeze(-1) * dz[layer], _t(sb))
        g_bar[..., -1, :] -= (hw * dz[layer]).sum(-1)
        n_bar[..., -1, :] -= (hs * dz[layer]).sum(-1)

    # ---- read ----
    if read == "chunk":
        o, qc = forward_pass(q, wg, activation=act_name, residual=mlp["residual"],
                             ln_weight=mlp["ln_weight"], ln_bias=mlp["ln_bias"],
                             ln_eps=mlp["ln_eps"])
        if mlp["residual"]:
            q_bar = q_bar + o_bar
        f_bar = _head_backward(o_bar, qc.xhat, qc.rstd, mlp, grads)
        q_bar = q_bar + _mlp_backward(f_bar, qc.h, qc.z, wg, act_name, wg_bar)
    else:
        hs, zs, hw0, hs0, amat = [], [], [], [], []
        h = q
        for layer in range(n_layers):
            hs.append(h)
            a = torch.matmul(h, _t(hk[layer]))
            hw0.append(torch.matmul(h, w0[layer]))
            hs0.append(torch.matmul(h, s0[layer]))
            amat.append(a)
            z = (beta.unsqueeze(-1) * hw0[-1] + c.unsqueeze(-1) * hs0[-1]
                 - torch.matmul(g_mat * a, dz[layer]))
            zs.append(z)
            h = activate(z, act_name) if layer < n_layers - 1 else z
        _, xhat, rstd = output_head(zs[-1], q, residual=mlp["residual"],
                                    ln_weight=mlp["ln_weight"], ln_bias=mlp["ln_bias"],
                                    ln_eps=mlp["ln_eps"])
        if mlp["residual"]:
            q_bar = q_bar + o_bar
        z_bar = _head_backward(o_bar, xhat, rstd, mlp, grads)
        for layer in range(n_layers - 1, -1, -1):
            h, a = hs[layer], amat[layer]
            beta_bar = beta_bar + (z_bar * hw0[layer]).sum(-1)
            c_bar = c_bar + (z_bar * hs0[layer]).sum(-1)
            w0_bar[layer] = w0_bar[layer] + torch.matmul(_t(h), beta.unsqueeze(-1) * z_bar)
            s0_bar[layer] = s0_bar[layer] + torch.matmul(_t(h), c.unsqueeze(-1) * z_bar)
            mm = -torch.matmul(z_bar, _t(dz[layer]))  # cotangent of G * A
            g_bar = g_bar + mm * a
            a_bar = mm * g_mat
            dz_bar[layer] = dz_bar[layer] - torch.matmul(_t(g_mat * a), z_bar)
            h_bar = (beta.unsqueeze(-1) * torch.matmul(z_bar, _t(w0[layer]))
                     + c.unsqueeze(-1) * torch.matmul(z_bar, _t(s0[layer]))
                     + torch.matmul(a_bar, hk[layer]))
            hk_bar[layer] = hk_bar[layer] + torch.matmul(_t(a_bar), h)
            if layer == 0:
                q_bar = q_bar + h_bar
            else:
                z_bar = h_bar * activate_grad(zs[layer - 1], act_name)

    # ---- keys: the errors' recursion, bottom layer up (second order) ----
    zk_bar = [torch.zeros_like(z) for z in kc.z]
    for layer in range(n_layers - 1):
        u = torch.matmul(dz[layer + 1], _t(wg[layer + 1]))
        d1 = activate_grad(kc.z[layer], act_name)
        u_bar = dz_bar[layer] * d1
        zk_bar[layer] = zk_bar[layer] + dz_bar[layer] * u * activate_grad2(kc.z[layer], act_name)
        dz_bar[layer + 1] = dz_bar[layer + 1] + torch.matmul(u_bar, wg[layer + 1])
        wg_bar[layer + 1] = wg_bar[layer + 1] + torch.matmul(_t(u_bar), dz[layer + 1])
    # LayerNorm double backward: dz_{L-1} = J(gamma E) at f
    f_bar, e_bar = _ln_double_backward(dz_bar[-1], e, dz[-1], kc.xhat, kc.rstd, mlp, grads)
    zk_bar[-1] = zk_bar[-1] + f_bar
    yk_bar = 2.0 * e_bar
    v_bar = -2.0 * e_bar
    k_bar = yk_bar if mlp["residual"] else torch.zeros_like(k)
    zk_bar[-1] = zk_bar[-1] + _head_backward(yk_bar, kc.xhat, kc.rstd, mlp, grads)
    # the keys' forward, top down, with the hk̄ of the read and the state
    for layer in range(n_layers - 1, -1, -1):
        wg_bar[layer] = wg_bar[layer] + torch.matmul(_t(hk[layer]), zk_bar[layer])
        h_bar = hk_bar[layer] + torch.matmul(zk_bar[layer], _t(wg[layer]))
        if layer == 0:
            k_bar = k_bar + h_bar
        else:
            zk_bar[layer - 1] = zk_bar[layer - 1] + h_bar * activate_grad(kc.z[layer - 1],
                                                                           act_name)

    # ---- gates ----
    lr_bar, decay_bar, eta_bar = gates.vjp(g_bar, n_bar, c_bar, beta_bar, m_bar)
    return {"q": q_bar, "k": k_bar, "v": v_bar, "lr": lr_bar, "decay": decay_bar,
            "eta": eta_bar, "w0": w0_bar, "s0": s0_bar, "wg": wg_bar,
            "ln_weight": _param_shape(grads["ln_weight"], mlp),
            "ln_bias": _param_shape(grads["ln_bias"], mlp)}


def sequence_vjp(q, k, v, lr, forget, momentum, weights, *, chunk_size, activation, residual,
                 ln_weight, ln_bias, ln_eps, read, initial_state, cu_seqlens, o_bar,
                 state_bar=None, checkpoint_every=1, one_chunk_vjp=None):
    """Cotangents of reference.neural_memory's inputs for o_bar (like o) and state_bar (None, or
    lists (weights, momentum, chunk_weights) like the final state's): the backward's outer loop
    as the fused kernel will run it, chunk by chunk in reverse with the state's cotangents
    carried. The forward keeps (W, S) at the start of every ``checkpoint_every``-th chunk only
    (O(T / (C K)) states); the walk back recomputes one group's K chunk-start states from its
    checkpoint at a time (K more), then takes the group's chunks in reverse. ``one_chunk_vjp``:
    the one-chunk adjoint (default chunk_step_vjp; the tests pass chunk_vjp_blocked's).

    Returns a dict: q, k, v, lr, forget, momentum (like the inputs), weights (per layer; zeros
    when an initial state is given), ln_weight, ln_bias ([H, D] or None), and state (lists
    weights, momentum, chunk_weights, or None without an initial state)."""
    P = ref._prepare(q, k, v, lr, forget, momentum, weights, chunk_size=chunk_size,
                     activation=activation, residual=residual, ln_weight=ln_weight,
                     ln_bias=ln_bias, ln_eps=ln_eps, initial_state=initial_state,
                     cu_seqlens=cu_seqlens)
    tl, dtype, mlp = P.timeline, P.dtype, P.mlp
    K = int(checkpoint_every)
    if K < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    one_chunk = chunk_step_vjp if one_chunk_vjp is None else one_chunk_vjp

    def step(j, w, s):
        """Chunk j's start (W0, S0, Wg) -> its end (W, S)."""
        wg = P.wg0 if j == 0 else w
        _, w, s = ref.chunk_step(P.qt[:, :, j], P.kt[:, :, j], P.vt[:, :, j], P.lr_t[:, :, j],
                                 P.decay_t[:, :, j], P.eta_t[:, :, j], P.act_t[:, :, j], w, s,
                                 wg, mlp=mlp, read=read)
        return w, s

    # forward: checkpoints at the start of chunks 0, K, 2K, ...
    checkpoints, w, s = [], P.w, P.s
    for j in range(P.n_chunks):
        if j % K == 0:
            checkpoints.append((w, s))
        w, s = step(j, w, s)
    ob = tl.lay_out(o_bar, 0.0, dtype)
    wb = [torch.zeros_like(t) for t in w]
    sb = [torch.zeros_like(t) for t in s]
    cw_to_wg = None  # cotangent of the final chunk weights, owed to the last chunk's wg
    if state_bar is not None:
        wb = [a + d.to(dtype) for a, d in zip(wb, state_bar[0])]
        sb = [a + d.to(dtype) for a, d in zip(sb, state_bar[1])]
        still_open = (tl.final_offset > 0).view(P.n_seq, 1, 1, 1)
        cwb = [d.to(dtype) for d in state_bar[2]]
        wb = [a + torch.where(still_open, torch.zeros_like(c), c) for a, c in zip(wb, cwb)]
        cw_to_wg = [torch.where(still_open, c, torch.zeros_like(c)) for c in cwb]
    owed = torch.ones(P.n_seq, 1, 1, 1, dtype=torch.bool, device=q.device)  # cw̄ not yet paid
    keys = ("q", "k", "v", "lr", "decay", "eta")
    per_chunk = {name: [None] * P.n_chunks for name in keys}
    ln_w_bar = ln_b_bar = None
    wg0_bar = None
    group = {}  # chunk -> its start (W0, S0, Wg), for the group being walked
    for j in range(P.n_chunks - 1, -1, -1):
        if j not in group:  # recompute the group's chunk starts from its checkpoint
            g0 = j - j % K
            group, (w, s) = {}, checkpoints[g0 // K]
            for i in range(g0, j + 1):
                group[i] = (w, s, P.wg0 if i == 0 else w)
                if i < j:
                    w, s = step(i, w, s)
        w0, s0, wg = group.pop(j)
        g = one_chunk(P.qt[:, :, j], P.kt[:, :, j], P.vt[:, :, j], P.lr_t[:, :, j],
                           P.decay_t[:, :, j], P.eta_t[:, :, j], P.act_t[:, :, j], w0, s0, wg,
                           ob[:, :, j], wb, sb, mlp=mlp, read=read)
        for name in keys:
            per_chunk[name][j] = g[name]
        if g["ln_weight"] is not None:
            ln_w_bar = g["ln_weight"] if ln_w_bar is None else ln_w_bar + g["ln_weight"]
        if g["ln_bias"] is not None:
            ln_b_bar = g["ln_bias"] if ln_b_bar is None else ln_b_bar + g["ln_bias"]
        wg_bar = g["wg"]
        if cw_to_wg is not None:
            last = tl.is_last_chunk(j)
            last = torch.as_tensor(last, device=q.device).view(-1, 1, 1, 1) & owed
            wg_bar = [a + torch.where(last, c, torch.zeros_like(c))
                      for a, c in zip(wg_bar, cw_to_wg)]
            owed = owed & ~last
        if j > 0:
            wb = [a + b for a, b in zip(g["w0"], wg_bar)]
        else:
            wb, wg0_bar = g["w0"], wg_bar
        sb = g["s0"]
    if wg0_bar is None:  # no chunk at all
        wg0_bar = [torch.zeros_like(t) for t in wb]
    if cw_to_wg is not None:  # sequences without tokens: their final cw is wg0
        wg0_bar = [a + torch.where(owed, c, torch.zeros_like(c))
                   for a, c in zip(wg0_bar, cw_to_wg)]

    def unlay(name, feature):
        if P.n_chunks == 0:
            return None
        x = torch.stack(per_chunk[name], dim=2)
        if not feature:
            x = x.unsqueeze(-1)
        out = tl.unlay(x).reshape(P.B, P.T, P.H, -1)
        return out if feature else out.squeeze(-1)
    out = {name: unlay(name, name in ("q", "k", "v")) for name in keys}
    out["forget"] = None if out["decay"] is None else -out.pop("decay")
    out["momentum"] = out.pop("eta")
    H, D = P.H, P.D
    out["ln_weight"] = None if ln_w_bar is None else ln_w_bar.reshape(H, D)
    out["ln_bias"] = None if ln_b_bar is None else ln_b_bar.reshape(H, D)
    if initial_state is None:
        out["weights"] = [(a + b).sum(0) for a, b in zip(wb, wg0_bar)]
        out["state"] = None
    else:
        open_chunk = P.open_chunk
        out["weights"] = [torch.zeros_like(t, dtype=dtype) for t in weights]
        out["state"] = (
            [a + torch.where(open_chunk, torch.zeros_like(b), b) for a, b in zip(wb, wg0_bar)],
            list(sb),
            [torch.where(open_chunk, b, torch.zeros_like(b)) for b in wg0_bar])
    return out
