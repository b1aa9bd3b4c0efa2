"""GPU tests (marked ``gpu``; skipped without CUDA): the memory_scan kernel against the float64
reference within SPEC §7, full writes, strides, streams, determinism, CUDA graphs,
torch.compile, opcheck; the reference on the GPU against the float64 CPU reference."""
from __future__ import annotations

import pytest
import torch

from conftest import make_inputs, make_weights, needs_kernels, rel_err
from titans_cuda import memory_scan, neural_memory
from titans_cuda.ops.memory_scan.ops import launch, launch_backward
from titans_cuda.ops.memory_scan.reference import scan_backward, scan_forward

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL_FP32 = 1e-5




# (B, H, NC, d_in, d_out, S0, per-row W0): odd sizes take the scalar path, E % 4 == 0 float4
SCAN_CASES = [
    (1, 1, 1, 1, 1, False, False), (2, 3, 5, 3, 5, True, True), (2, 16, 128, 64, 256, True, False),
    (1, 2, 0, 8, 8, True, False), (3, 4, 33, 32, 32, False, True), (1, 8, 257, 16, 16, True, True),
    (2, 2, 9, 7, 9, True, False), (4, 1, 64, 128, 512, False, False),
    (1, 5, 17, 64, 64, True, True), (2, 3, 4, 2, 2, False, False),
]


def _scan_inputs(B, H, NC, di, do, with_s0, per_row, device=DEV, dtype=torch.float32):
    kw = dict(device=device, dtype=dtype)
    U = (torch.randn(B, H, NC, di, do, **kw), torch.randn(B, H, NC, do, di, **kw))
    alpha, eta = torch.rand(B, NC, H, **kw), torch.rand(B, NC, H, **kw)
    if NC:
        alpha[:, 0] = 1.0
        eta[:, -1] = 0.0
    lead = (B, H) if per_row else (H,)
    W0 = tuple(torch.randn(*lead, *u.shape[-2:], **kw) for u in U)
    S0 = tuple(torch.randn(B, H, *u.shape[-2:], **kw) for u in U) if with_s0 else None
    return U, alpha, eta, W0, S0


def _first_layer(case, device=DEV):
    """The first layer of _scan_inputs(*case) in the ops' flat layout: U [B, H, NC, E], the
    gates, W0 broadcast to [B, H, E] and S0 [B, H, E] or None."""
    B, H, NC, di, do, _, _ = case
    U, alpha, eta, W0, S0 = _scan_inputs(*case, device=device)
    E = di * do
    return (U[0].reshape(B, H, NC, E), alpha, eta, W0[0].reshape(-1, H, E).expand(B, H, E),
            None if S0 is None else S0[0].reshape(B, H, E))


def _dbl(ts):
    return None if ts is None else tuple(t.double() for t in ts)


@pytest.mark.parametrize("case", SCAN_CASES, ids=[str(c) for c in SCAN_CASES])
def test_memory_scan_kernel_matches_float64_reference(case):
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(*case)
    w_all, s_last = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0,
                                backend="cuda")
    w_ref, s_ref = memory_scan(_dbl(U), alpha.double(), eta.double(), initial_weights=_dbl(W0),
                               initial_momentum=_dbl(S0), backend="torch")
    for a, b in zip(w_all + s_last, w_ref + s_ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) <= TOL_FP32


@pytest.mark.parametrize("case", SCAN_CASES, ids=[str(c) for c in SCAN_CASES])
def test_memory_scan_kernel_writes_every_element(case):
    """Outputs pre-filled with NaN: any element the kernel skips stays NaN."""
    needs_kernels()
    u, alpha, eta, w0, s0 = _first_layer(case)
    B, H, NC, E = u.shape
    out = (torch.full((B, H, NC, E), float("nan"), device=DEV),
           torch.full((B, H, E), float("nan"), device=DEV))
    launch(u, alpha, eta, w0, s0, out=out)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    w_ref, s_ref = scan_forward(u.double(), alpha.double(), eta.double(), w0.double(),
                                None if s0 is None else s0.double())
    assert rel_err(out[0], w_ref) <= TOL_FP32 and rel_err(out[1], s_ref) <= TOL_FP32


@pytest.mark.parametrize("case", SCAN_CASES, ids=[str(c) for c in SCAN_CASES])
def test_memory_scan_backward_kernel_matches_float64_and_writes_everything(case):
    """The reverse-scan kernel into NaN-poisoned outputs, against the float64 reverse scan."""
    needs_kernels()
    u, alpha, eta, w0, s0 = _first_layer(case)
    B, H, NC, E = u.shape
    w_all, _ = launch(u, alpha, eta, w0, s0)
    g_w, g_s = torch.randn(B, H, NC, E, device=DEV), torch.randn(B, H, E, device=DEV)
    nan = dict(fill_value=float("nan"), device=DEV)
    out = (torch.full((B, H, NC, E), **nan), torch.full((B, NC, H), **nan),
           torch.full((B, NC, H), **nan), torch.full((B, H, E), **nan),
           None if s0 is None else torch.full((B, H, E), **nan))
    got = launch_backward(g_w, g_s, u, alpha, eta, w0, s0, w_all, out=out)
    w_all64, _ = scan_forward(u.double(), alpha.double(), eta.double(), w0.double(),
                              None if s0 is None else s0.double())
    want = scan_backward(g_w.double(), g_s.double(), u.double(), alpha.double(), eta.double(),
                         w0.double(), None if s0 is None else s0.double(), w_all64)
    for name, a, b in zip(("dU", "d_forget", "d_momentum", "dW0", "dS0"), got, want):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= TOL_FP32, (name, rel_err(a, b))


def test_memory_scan_backward_kernel_is_deterministic():
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(2, 16, 64, 64, 256, True, False)
    leaves = [t.clone().requires_grad_(True) for t in (*U, alpha, eta)]

    def grads():
        w_all, s_last = memory_scan(tuple(leaves[:2]), leaves[2], leaves[3],
                                    initial_weights=W0, initial_momentum=S0, backend="cuda")
        loss = sum((w * w).sum() for w in w_all) + sum(x.sum() for x in s_last)
        return torch.autograd.grad(loss, leaves)
    first = grads()
    for _ in range(2):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_memory_scan_kernel_strided_inputs():
    """Non-contiguous updates (a slice of a larger buffer), gates transposed, W0 per row with a
    padded head stride: the launcher's strides must be honoured."""
    needs_kernels()
    B, H, NC, di, do = 2, 3, 11, 8, 12
    big = torch.randn(B, H, NC + 4, di, do, device=DEV)
    U = (big[:, :, 2:NC + 2],)
    alpha = torch.rand(B, H, NC, device=DEV).transpose(1, 2)  # [B, NC, H] with odd strides
    eta = torch.rand(B, H, NC, device=DEV).transpose(1, 2)
    W0 = (torch.randn(B, H + 2, di, do, device=DEV)[:, 1:H + 1],)
    S0 = (torch.randn(B, H, di, do, device=DEV),)
    w_all, s_last = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0,
                                backend="cuda")
    w_ref, s_ref = memory_scan(_dbl(U), alpha.double(), eta.double(), initial_weights=_dbl(W0),
                               initial_momentum=_dbl(S0), backend="torch")
    assert rel_err(w_all[0], w_ref[0]) <= TOL_FP32 and rel_err(s_last[0], s_ref[0]) <= TOL_FP32


def test_memory_scan_backward_on_gpu_matches_float64():
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(2, 3, 20, 8, 16, True, False)
    leaves = [t.clone().requires_grad_(True) for t in (*U, alpha, eta, *W0, *S0)]

    def run(ls, backend):
        u, a, e, w0, s0 = ls[:2], ls[2], ls[3], ls[4:6], ls[6:]
        w_all, s_last = memory_scan(tuple(u), a, e, initial_weights=tuple(w0),
                                    initial_momentum=tuple(s0), backend=backend)
        return w_all + s_last
    outs = run(leaves, "cuda")
    cot = [torch.randn_like(o) for o in outs]
    g = torch.autograd.grad(outs, leaves, cot)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    outs64 = run(leaves64, "torch")
    g64 = torch.autograd.grad(outs64, leaves64, [c.double() for c in cot])
    for a, b in zip(g, g64):
        assert rel_err(a, b) <= TOL_FP32


def test_memory_scan_kernel_is_deterministic():
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(2, 16, 64, 64, 256, True, False)
    first = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0, backend="cuda")
    for _ in range(3):
        again = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0,
                            backend="cuda")
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b)


def test_memory_scan_kernel_on_side_stream():
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(2, 4, 32, 32, 64, True, False)
    ref = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0,
                          backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert torch.equal(a, b)


def test_memory_scan_cuda_graph_capture_and_replay():
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(2, 4, 16, 16, 32, True, False)
    static = [t.clone() for t in (*U, alpha, eta)]

    def step():
        return memory_scan(tuple(static[:2]), static[2], static[3], initial_weights=W0,
                           initial_momentum=S0, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    fresh = _scan_inputs(2, 4, 16, 16, 32, True, False)
    for dst, src in zip(static, (*fresh[0], fresh[1], fresh[2])):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want = memory_scan(tuple(static[:2]), static[2], static[3], initial_weights=W0,
                       initial_momentum=S0, backend="cuda")
    for a, b in zip(out[0] + out[1], want[0] + want[1]):
        assert torch.equal(a, b)


def test_memory_scan_torch_compile_fullgraph():
    needs_kernels()
    U, alpha, eta, W0, S0 = _scan_inputs(2, 4, 16, 16, 32, True, False)

    def fn(u0, u1, a, e):
        w_all, s_last = memory_scan((u0, u1), a, e, initial_weights=W0, initial_momentum=S0,
                                    backend="cuda")
        return w_all[0].sum(dim=2) + 1.0, s_last[1] * 2.0
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(*U, alpha, eta)
    want = fn(*U, alpha, eta)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-6


def test_opcheck_memory_scan_on_gpu():
    needs_kernels()
    B, H, NC, E = 2, 3, 6, 20
    args = [torch.randn(B, H, NC, E, device=DEV), torch.rand(B, NC, H, device=DEV),
            torch.rand(B, NC, H, device=DEV), torch.randn(H, E, device=DEV).expand(B, H, E),
            torch.randn(B, H, E, device=DEV)]
    for t in args:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.titans_cuda.memory_scan.default, args)


def test_scan_reference_backward_matches_autograd_float64():
    """The hand-written reverse scan against autograd through the forward loop."""
    B, H, NC, E = 2, 3, 9, 10
    kw = dict(device=DEV, dtype=torch.float64)
    u = torch.randn(B, H, NC, E, **kw, requires_grad=True)
    a = torch.rand(B, NC, H, **kw, requires_grad=True)
    e = torch.rand(B, NC, H, **kw, requires_grad=True)
    w0 = torch.randn(B, H, E, **kw, requires_grad=True)
    s0 = torch.randn(B, H, E, **kw, requires_grad=True)
    w_all, s_last = scan_forward(u, a, e, w0, s0)
    gw, gs = torch.randn_like(w_all), torch.randn_like(s_last)
    auto = torch.autograd.grad((w_all, s_last), (u, a, e, w0, s0), (gw, gs))
    mine = scan_backward(gw, gs, u, a, e, w0, s0, w_all.detach())
    for x, y in zip(mine, auto):
        assert rel_err(x, y) < 1e-12


# fp32 without LayerNorm over all of alpha in [0, 1]; LayerNorm with alpha <= 0.1 (+ resets):
# LN of an almost erased memory (alpha ~ U[0, 1] empties W within a few tokens) divides by a
# vanishing norm, an ill-conditioned function no fp32 implementation meets 1e-5 on (measured
# ~1e-4 for the fp32 reference on the CPU too; see the README's precision notes). The bound is
# SPEC §7's tolerance, or twice the CPU fp32 reference's own error on the same inputs where a
# draw is that ill-conditioned (STYLE: tolerances relative to the reference's own rounding).
@pytest.mark.parametrize("dtype,tol,ln", [(torch.float32, 1e-5, False), (torch.bfloat16, 2e-2, True),
                                          (torch.float16, 5e-3, True)])
@pytest.mark.parametrize("read", ["token", "chunk"])
def test_reference_on_gpu_within_spec_tolerance(dtype, tol, ln, read):
    """What users get on a GPU with backend='auto' (the chunked kernel for bf16/fp16, the
    reference for fp32; gradients from the reference's VJP): outputs, state and input
    gradients against the float64 reference on the same rounded inputs."""
    B, T, H, D, C = 2, 100, 4, 32, 16
    args = list(make_inputs(B, T, H, D, dtype=torch.float32, lr_max=0.3))
    if ln:
        args[4] = torch.where(args[4] == 1.0, args[4], 0.1 * args[4])
    args = [t.to(dtype) for t in args]
    weights = make_weights(H, D, 64, 2, dtype=torch.float32)
    gamma = 1 + 0.2 * torch.randn(H, D) if ln else None
    cot = torch.randn(B, T, H, D, dtype=torch.float64)

    def run(device, to_dtype, backend):
        leaves = [a.to(device, to_dtype or a.dtype).requires_grad_(True) for a in args]
        ws = tuple(w.to(device, to_dtype or w.dtype) for w in weights)
        g_ln = None if gamma is None else gamma.to(device, to_dtype or gamma.dtype)
        o, st = neural_memory(*leaves, ws, chunk_size=C, residual=True, ln_weight=g_ln,
                              read=read, output_final_state=True, backend=backend)
        grads = torch.autograd.grad((o * cot.to(device, o.dtype)).sum(), leaves[:3])
        return [o] + list(st.weights + st.momentum) + list(grads)
    gpu = run(DEV, None, "auto")
    assert gpu[0].dtype == dtype and gpu[0].is_cuda
    cpu = run("cpu", None, "torch")
    exact = run("cpu", torch.float64, "torch")
    names = ["o"] + [f"W{i}" for i in range(2)] + [f"S{i}" for i in range(2)] + ["dq", "dk", "dv"]
    for name, a, c, e in zip(names, gpu, cpu, exact):
        bound = max(tol, 2 * rel_err(c, e))
        assert rel_err(a, e) <= bound, (name, rel_err(a, e), rel_err(c, e))


def test_neural_memory_backend_cuda_raises_where_no_kernel_applies():
    """Calls longer than the decode kernel's 16 tokens go to the chunked kernel, which takes
    bf16/fp16 inputs (fp32 at depth 1 only) and D in (32, 64, 128): fp32 inputs at depth 2 and
    D = 16 raise naming why."""
    needs_kernels()
    B, T, H, D = 1, 40, 2, 16
    args = make_inputs(B, T, H, D, dtype=torch.float32, device=DEV)
    weights = make_weights(H, D, 32, 2, dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match="bf16/fp16"):
        neural_memory(*args, weights, backend="cuda")
    half = [t.to(torch.bfloat16) if i < 3 else t for i, t in enumerate(args)]
    with pytest.raises(RuntimeError, match="no chunked kernel for D=16"):
        neural_memory(*half, weights, backend="cuda")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_parallel_neural_memory_on_gpu_within_spec_tolerance(dtype, tol):
    """The composed variant on the kernels (memory_mlp tiles and the scan, forward and
    backward) against the float64 composition on the CPU: output and every input gradient.
    fp32: the bound is SPEC's 1e-5 or twice the CPU fp32 reference's own error, as above."""
    needs_kernels()
    from titans_cuda import parallel_neural_memory
    B, T, H, D, C = 2, 96, 4, 32, 16
    q, k, v, lr, _, _ = make_inputs(B, T, H, D, dtype=torch.float32, lr_max=0.1)
    args = [t.to(dtype) for t in (q, k, v)] + [lr]
    alpha, eta = 0.1 * torch.rand(B, T // C, H), torch.rand(B, T // C, H)
    weights = make_weights(H, D, 64, 2, dtype=torch.float32)
    gamma = 1 + 0.2 * torch.randn(H, D)
    cot = torch.randn(B, T, H, D, dtype=torch.float64)

    def run(device, to_dtype, backend):
        leaves = [a.to(device, to_dtype or a.dtype).requires_grad_(True)
                  for a in (*args, alpha, eta, *weights)]
        o = parallel_neural_memory(*leaves[:6], tuple(leaves[6:]), chunk_size=C, residual=True,
                                   ln_weight=gamma.to(device, to_dtype or gamma.dtype),
                                   backend=backend)
        return [o] + list(torch.autograd.grad((o * cot.to(device, o.dtype)).sum(), leaves))
    got = run(DEV, None, "cuda")
    want = run("cpu", torch.float64, "torch")
    cpu = run("cpu", None, "torch") if dtype == torch.float32 else want
    for i, (a, b, c) in enumerate(zip(got, want, cpu)):
        bound = max(tol, 2 * rel_err(c, b))
        assert rel_err(a, b) <= bound, (i, rel_err(a, b), rel_err(c, b))
