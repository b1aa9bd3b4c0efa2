"""memory_forward, memory_grad and memory_scan against definitions written in the test:
the MLP of the oracle token by token, torch.func.grad of the SPEC loss, and a plain scan loop."""
from __future__ import annotations

import pytest
import torch

from conftest import make_inputs, make_weights, rel_err
from oracle import mlp
from titans_cuda import memory_forward, memory_grad, memory_scan
from titans_cuda.ops.memory_mlp.reference import inner_update, loss_errors

TOL = 1e-12


def _weights_for(w, b, t, C):
    """The [H, d_in, d_out] weights token t of row b uses, for any of the three layouts."""
    if w.dim() == 3:
        return w
    if w.dim() == 4:
        return w[b]
    return w[b, :, t // C]


LAYOUTS = ["shared", "per_row", "per_chunk"]
CASES = [(2, 7, 2, 4, 3, 2, "silu", True, True), (1, 9, 3, 5, 4, 1, "gelu", False, False),
         (2, 8, 1, 3, 8, 3, "gelu", True, False), (3, 5, 2, 4, 1, 2, "silu", False, True)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,T,H,D,C,depth,act,residual,ln", CASES)
def test_memory_forward_matches_per_token_mlp(layout, B, T, H, D, C, depth, act, residual, ln):
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    n_chunks = -(-T // C)
    lead = {"shared": (H,), "per_row": (B, H), "per_chunk": (B, H, n_chunks)}[layout]
    weights = make_weights(H, D, 2 * D, depth, lead=lead)
    g = 1 + 0.3 * torch.randn(H, D, dtype=torch.float64) if ln else None
    b = 0.3 * torch.randn(H, D, dtype=torch.float64) if ln else None
    y = memory_forward(x, weights, chunk_size=C, activation=act, residual=residual,
                       ln_weight=g, ln_bias=b, backend="torch")
    assert y.shape == x.shape and y.dtype == x.dtype
    for bi in range(B):
        for t in range(T):
            w = [_weights_for(wl, bi, t, C) for wl in weights]
            want = mlp(x[bi, t], w, act, residual, g, b, 1e-6)
            assert rel_err(y[bi, t], want) < TOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,T,H,D,C,depth,act,residual,ln", CASES)
def test_memory_grad_matches_func_grad(layout, B, T, H, D, C, depth, act, residual, ln):
    """U_j = sum_{t in chunk j} lr_t grad_W ||M_W(k_t) - v_t||^2 with grad from torch.func."""
    _, k, v, lr, _, _ = make_inputs(B, T, H, D)
    n_chunks = -(-T // C)
    lead = {"shared": (H,), "per_row": (B, H), "per_chunk": (B, H, n_chunks)}[layout]
    weights = make_weights(H, D, 2 * D, depth, lead=lead)
    g = 1 + 0.3 * torch.randn(H, D, dtype=torch.float64) if ln else None
    b = 0.3 * torch.randn(H, D, dtype=torch.float64) if ln else None
    U = memory_grad(k, v, lr, weights, chunk_size=C, activation=act, residual=residual,
                    ln_weight=g, ln_bias=b, backend="torch")
    assert len(U) == depth
    for u, w in zip(U, weights):
        assert u.shape == (B, H, n_chunks, *w.shape[-2:])
    for bi in range(B):
        for j in range(n_chunks):
            want = [torch.zeros_like(u[bi, :, j]) for u in U]
            for t in range(j * C, min(T, (j + 1) * C)):
                w = [_weights_for(wl, bi, t, C) for wl in weights]
                grads = torch.func.grad(
                    lambda ws: ((mlp(k[bi, t], ws, act, residual, g, b, 1e-6) - v[bi, t]) ** 2)
                    .sum())(w)
                for acc, gr in zip(want, grads):
                    acc += lr[bi, t].view(H, 1, 1) * gr
            for u, wu in zip(U, want):
                assert rel_err(u[bi, :, j], wu) < 1e-11


def test_explicit_inner_gradient_matches_func_grad():
    """The hand-written backward (LN, activations) against torch.func.grad, token by token."""
    H, D, C = 3, 6, 5
    for act in ("silu", "gelu"):
        w = make_weights(H, D, 12, 3)
        k = torch.randn(H, C, D, dtype=torch.float64)
        v = torch.randn(H, C, D, dtype=torch.float64)
        g = 1 + 0.3 * torch.randn(H, 1, D, dtype=torch.float64)
        b = 0.3 * torch.randn(H, 1, D, dtype=torch.float64)
        cache, dz = loss_errors(k, v, w, activation=act, residual=True, ln_weight=g, ln_bias=b,
                                ln_eps=1e-6)
        for t in range(C):
            onehot = torch.zeros(H, C, dtype=torch.float64)
            onehot[:, t] = 1
            ours = inner_update(cache, dz, onehot)
            want = torch.func.grad(lambda ws: ((mlp(k[:, t], ws, act, True, g[:, 0], b[:, 0],
                                                    1e-6) - v[:, t]) ** 2).sum())(list(w))
            for a, bb in zip(ours, want):
                assert rel_err(a, bb) < TOL


@pytest.mark.parametrize("with_s0,per_row", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("NC", [0, 1, 6])
def test_memory_scan_matches_loop(with_s0, per_row, NC):
    B, H = 2, 3
    U = (torch.randn(B, H, NC, 2, 5, dtype=torch.float64),
         torch.randn(B, H, NC, 5, 2, dtype=torch.float64))
    alpha = torch.rand(B, NC, H, dtype=torch.float64)
    eta = torch.rand(B, NC, H, dtype=torch.float64)
    if NC:
        alpha[:, 0, 1] = 1.0
        eta[:, -1, 0] = 0.0
    lead = (B, H) if per_row else (H,)
    W0 = tuple(torch.randn(*lead, *u.shape[-2:], dtype=torch.float64) for u in U)
    S0 = tuple(torch.randn(B, H, *u.shape[-2:], dtype=torch.float64) for u in U) \
        if with_s0 else None
    w_all, s_last = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0,
                                backend="torch")
    for layer in range(2):
        for bi in range(B):
            for h in range(H):
                w = W0[layer][bi, h] if per_row else W0[layer][h]
                s = S0[layer][bi, h] if with_s0 else torch.zeros_like(w)
                for j in range(NC):
                    s = eta[bi, j, h] * s - U[layer][bi, h, j]
                    w = (1 - alpha[bi, j, h]) * w + s
                    assert torch.allclose(w_all[layer][bi, h, j], w, rtol=0, atol=1e-13)
                assert torch.allclose(s_last[layer][bi, h], s, rtol=0, atol=1e-13)


def test_single_chunk_read_chunk_equals_memory_forward():
    """With one chunk and read='chunk', neural_memory reads the initial weights everywhere."""
    from titans_cuda import neural_memory
    B, T, H, D = 2, 6, 2, 4
    args = make_inputs(B, T, H, D)
    weights = make_weights(H, D, 8, 2)
    o, _ = neural_memory(*args, weights, chunk_size=T, read="chunk", residual=True,
                         backend="torch")
    assert rel_err(o, memory_forward(args[0], weights, residual=True, backend="torch")) < TOL


@pytest.mark.parametrize("T,C,residual,ln", [(9, 4, True, True), (8, 8, False, False),
                                             (7, 2, True, False), (5, 16, False, True)])
def test_parallel_neural_memory_matches_direct_loop(T, C, residual, ln):
    """The fully parallel variant against a loop written from its definition, with gradients
    from torch.func.grad at the call's initial weights."""
    from titans_cuda import parallel_neural_memory
    B, H, D = 2, 2, 3
    q, k, v, lr, _, _ = make_inputs(B, T, H, D)
    n_chunks = -(-T // C)
    alpha = torch.rand(B, n_chunks, H, dtype=torch.float64)
    eta = torch.rand(B, n_chunks, H, dtype=torch.float64)
    weights = make_weights(H, D, 5, 2)
    g = 1 + 0.3 * torch.randn(H, D, dtype=torch.float64) if ln else None
    b = 0.3 * torch.randn(H, D, dtype=torch.float64) if ln else None
    o, (w_last, s_last) = parallel_neural_memory(
        q, k, v, lr, alpha, eta, weights, chunk_size=C, activation="gelu", residual=residual,
        ln_weight=g, ln_bias=b, output_final_state=True, backend="torch")
    for bi in range(B):
        w = [x.clone() for x in weights]
        s = [torch.zeros_like(x) for x in weights]
        for j in range(n_chunks):
            toks = range(j * C, min(T, (j + 1) * C))
            for t in toks:  # read chunk j with W_{j-1}
                want = mlp(q[bi, t], w, "gelu", residual, g, b, 1e-6)
                assert rel_err(o[bi, t], want) < TOL
            u = [torch.zeros_like(x) for x in weights]
            for t in toks:  # gradients at the call's initial weights
                grads = torch.func.grad(lambda ws: ((mlp(k[bi, t], ws, "gelu", residual, g, b,
                                                         1e-6) - v[bi, t]) ** 2).sum())(
                    list(weights))
                for acc, gr in zip(u, grads):
                    acc += lr[bi, t].view(H, 1, 1) * gr
            s = [eta[bi, j].view(H, 1, 1) * s_l - u_l for s_l, u_l in zip(s, u)]
            w = [(1 - alpha[bi, j]).view(H, 1, 1) * w_l + s_l for w_l, s_l in zip(w, s)]
        for got, want in zip(w_last + s_last, w + s):
            assert rel_err(got[bi], want) < TOL


def test_parallel_neural_memory_gradcheck():
    from titans_cuda import parallel_neural_memory
    B, T, H, D, C = 1, 5, 2, 3, 2
    q, k, v, lr, _, _ = make_inputs(B, T, H, D)
    alpha, eta = torch.rand(B, 3, H, dtype=torch.float64), torch.rand(B, 3, H, dtype=torch.float64)
    weights = make_weights(H, D, 4, 2)
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, lr, alpha, eta,
                                                               *weights)]

    def fn(q, k, v, lr, a, e, *w):
        return parallel_neural_memory(q, k, v, lr, a, e, w, chunk_size=C, residual=True,
                                      backend="torch")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_parallel_neural_memory_rejects_per_token_gates():
    from titans_cuda import parallel_neural_memory
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"forget must have shape \(1, 2, 2\)"):
        parallel_neural_memory(q, q, q, torch.rand(1, 8, 2), torch.rand(1, 8, 2),
                               torch.rand(1, 8, 2), (torch.randn(2, 4, 4),), chunk_size=4)
