"""Pure-PyTorch reference of the chunk-level memory scan (SPEC §5, memory_scan).

    S_j = eta_j S_{j-1} - U_j
    W_j = (1 - alpha_j) W_{j-1} + S_j          j = 1..NC

One layer at a time, elementwise over the flattened weight (E = d_in * d_out): the scan loops
over chunks and is vectorised over batch, heads and elements. The reverse scan (backward) is
written out here too; the custom op uses it until the backward kernel exists.
"""
from __future__ import annotations

import torch


def scan_forward(updates, forget, momentum, w0, s0):
    """updates [B, H, NC, E]; forget, momentum [B, NC, H]; w0 [B, H, E]; s0 [B, H, E] or None.
    Returns (W_all [B, H, NC, E], S_last [B, H, E]) in updates' dtype."""
    B, H, n_chunks, E = updates.shape
    decay = (1.0 - forget).to(updates.dtype).permute(0, 2, 1).unsqueeze(-1)  # [B, H, NC, 1]
    eta = momentum.to(updates.dtype).permute(0, 2, 1).unsqueeze(-1)
    w = w0.to(updates.dtype).expand(B, H, E)
    s = torch.zeros_like(w) if s0 is None else s0.to(updates.dtype).expand(B, H, E)
    w_all = []
    for j in range(n_chunks):
        s = eta[:, :, j] * s - updates[:, :, j]
        w = decay[:, :, j] * w + s
        w_all.append(w)
    if w_all:
        w_all = torch.stack(w_all, dim=2)
    else:
        w_all = updates.new_empty(B, H, 0, E)
    return w_all, s


def scan_backward(grad_w_all, grad_s_last, updates, forget, momentum, w0, s0, w_all):
    """The reverse scan. With lamW_j = dL/dW_j and lamS_j = dL/dS_j (totals),

        lamW_j = gW_j + (1 - alpha_{j+1}) lamW_{j+1}
        lamS_j = lamW_j + eta_{j+1} lamS_{j+1}          (lamS_NC gets gS_last too)
        dU_j = -lamS_j,  d eta_j = <lamS_j, S_{j-1}>,  d alpha_j = -<lamW_j, W_{j-1}>
        dW_0 = (1 - alpha_1) lamW_1,  dS_0 = eta_1 lamS_1

    S_{j-1} is recomputed by a forward pass (not from W_j - (1 - alpha_j) W_{j-1}, which would
    cancel catastrophically when |S| << |W|). Returns (dU, d forget, d momentum, dW0, dS0)."""
    B, H, n_chunks, E = updates.shape
    dtype = updates.dtype
    decay = (1.0 - forget).to(dtype).permute(0, 2, 1).unsqueeze(-1)
    eta = momentum.to(dtype).permute(0, 2, 1).unsqueeze(-1)
    s = torch.zeros(B, H, E, dtype=dtype, device=updates.device) if s0 is None \
        else s0.to(dtype).expand(B, H, E)
    s_prev = []  # S_{j-1} for j = 1..NC
    for j in range(n_chunks):
        s_prev.append(s)
        s = eta[:, :, j] * s - updates[:, :, j]
    w0 = w0.to(dtype).expand(B, H, E)
    carry_w = torch.zeros(B, H, E, dtype=dtype, device=updates.device)
    carry_s = carry_w.clone() if grad_s_last is None else grad_s_last.to(dtype).expand(B, H, E)
    d_updates = torch.empty_like(updates)
    d_decay = updates.new_empty(B, H, n_chunks)
    d_eta = updates.new_empty(B, H, n_chunks)
    for j in range(n_chunks - 1, -1, -1):
        lam_w = carry_w if grad_w_all is None else grad_w_all[:, :, j] + carry_w
        lam_s = lam_w + carry_s
        d_updates[:, :, j] = -lam_s
        w_prev = w_all[:, :, j - 1] if j > 0 else w0
        d_decay[:, :, j] = (lam_w * w_prev).sum(-1)
        d_eta[:, :, j] = (lam_s * s_prev[j]).sum(-1)
        carry_w = decay[:, :, j] * lam_w
        carry_s = eta[:, :, j] * lam_s
    d_forget = (-d_decay).permute(0, 2, 1).to(forget.dtype)
    d_momentum = d_eta.permute(0, 2, 1).to(momentum.dtype)
    return d_updates, d_forget, d_momentum, carry_w, (None if s0 is None else carry_s)
