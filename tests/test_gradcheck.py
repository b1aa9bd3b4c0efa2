"""float64 torch.autograd.gradcheck of every differentiable input of every public function."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from conftest import make_inputs, make_weights
from titans_cuda import MemoryState, memory_forward, memory_grad, memory_scan, neural_memory


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("read", ["token", "chunk"])
@pytest.mark.parametrize("depth,activation", [(1, "silu"), (2, "gelu"), (2, "silu")])
def test_neural_memory_gradcheck(read, depth, activation):
    B, T, H, D, C = 1, 6, 2, 3, 4
    q, k, v, lr, forget, momentum = make_inputs(B, T, H, D)  # includes alpha=1 and eta=0
    weights = make_weights(H, D, 4, depth)
    n_layers = len(weights)
    state_w = tuple(w.unsqueeze(0) + 0.1 * torch.randn(1, *w.shape, dtype=w.dtype)
                    for w in weights)
    state_s = tuple(0.1 * torch.randn(1, *w.shape, dtype=w.dtype) for w in weights)
    state_cw = tuple(w.unsqueeze(0) + 0.1 * torch.randn(1, *w.shape, dtype=w.dtype)
                     for w in weights)
    offset = torch.tensor([1])
    gamma = 1 + 0.2 * torch.randn(H, D, dtype=torch.float64)
    beta = 0.2 * torch.randn(H, D, dtype=torch.float64)
    inputs = [_leaf(t) for t in (q, k, v, lr, forget, momentum, gamma, beta, *weights,
                                 *state_w, *state_s, *state_cw)]

    def fn(q, k, v, lr, forget, momentum, gamma, beta, *rest):
        w = rest[:n_layers]
        st = MemoryState(rest[n_layers:2 * n_layers], rest[2 * n_layers:3 * n_layers],
                         rest[3 * n_layers:], offset)
        o, out = neural_memory(q, k, v, lr, forget, momentum, w, chunk_size=C,
                               activation=activation, residual=True, ln_weight=gamma,
                               ln_bias=beta, read=read, initial_state=st,
                               output_final_state=True, backend="torch")
        return (o,) + out.weights + out.momentum + out.chunk_weights
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["shared", "per_row", "per_chunk"])
def test_memory_forward_and_grad_gradcheck(layout):
    B, T, H, D, C = 2, 5, 2, 3, 2
    q, k, v, lr, _, _ = make_inputs(B, T, H, D)
    lead = {"shared": (H,), "per_row": (B, H), "per_chunk": (B, H, 3)}[layout]
    weights = make_weights(H, D, 4, 2, lead=lead)
    gamma = 1 + 0.2 * torch.randn(H, D, dtype=torch.float64)
    beta = 0.2 * torch.randn(H, D, dtype=torch.float64)
    kw = dict(chunk_size=C, activation="gelu", residual=True)

    def fwd(x, g, b, *w):
        return memory_forward(x, w, ln_weight=g, ln_bias=b, backend="torch", **kw)
    assert gradcheck(fwd, [_leaf(t) for t in (q, gamma, beta, *weights)], eps=1e-6, atol=1e-6)

    def grad_fn(k, v, lr, g, b, *w):  # second-order terms of the inner gradient
        return memory_grad(k, v, lr, w, ln_weight=g, ln_bias=b, backend="torch", **kw)
    assert gradcheck(grad_fn, [_leaf(t) for t in (k, v, lr, gamma, beta, *weights)], eps=1e-6,
                     atol=1e-6)


@pytest.mark.parametrize("with_s0", [False, True])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_memory_scan_gradcheck(with_s0, backend):
    """backend='auto' on CPU runs the reference; the custom op's backward is checked through
    torch.ops directly in test_ops.py."""
    B, H, NC = 2, 2, 5
    U = (torch.randn(B, H, NC, 3, 4, dtype=torch.float64),
         torch.randn(B, H, NC, 4, 3, dtype=torch.float64))
    alpha = torch.rand(B, NC, H, dtype=torch.float64)
    alpha[0, 1, 0] = 1.0
    eta = torch.rand(B, NC, H, dtype=torch.float64)
    eta[1, 2, 1] = 0.0
    W0 = (torch.randn(H, 3, 4, dtype=torch.float64), torch.randn(B, H, 4, 3, dtype=torch.float64))
    S0 = tuple(torch.randn(B, H, *u.shape[-2:], dtype=torch.float64) for u in U)

    def fn(a, e, u0, u1, w0, w1, *s):
        w_all, s_last = memory_scan((u0, u1), a, e, initial_weights=(w0, w1),
                                    initial_momentum=s if s else None, backend=backend)
        return w_all + s_last
    inputs = [_leaf(t) for t in (alpha, eta, *U, *W0, *(S0 if with_s0 else ()))]
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
