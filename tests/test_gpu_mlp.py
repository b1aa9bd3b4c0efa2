"""GPU tests of the memory-MLP kernels (marked ``gpu``; skipped without CUDA): memory_forward
(forward and backward) and memory_grad (forward, and its backward) against the float64
reference on the same rounded inputs, within SPEC §7, over a grid covering every option of
issue 3: D, expansion, depth, activation, residual, LayerNorm (with and without bias), weight
layout (shared / per row / per chunk), dtype, chunk sizes 1..256 and partial last chunks.
Plus full writes (NaN-poisoned outputs), determinism, strides, CUDA graphs, torch.compile and
opcheck on the kernel path."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import needs_kernels, rel_err
from titans_cuda import _lib, memory_forward, memory_grad
from titans_cuda.ops.memory_mlp import ops as mlp_ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}

DIMS = (16, 32, 64, 128)
SHAPES = [(D, e, 2) for D in DIMS for e in (1, 2, 4)] + [(D, 1, 1) for D in DIMS]  # 16
LAYOUTS = ("shared", "row", "chunk")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (chunk, T) pairs: chunk 1, chunks below / at / above the 64-row tile, partial last chunks,
# a chunk longer than the sequence.
CHUNKS = [(1, 7), (16, 64), (48, 100), (64, 200), (100, 130), (256, 300), (64, 64), (128, 90),
          (32, 33), (200, 150)]
HEADS = [(False, False, None), (True, False, None), (False, True, "bias"), (True, True, None),
         (True, True, "bias"), (False, True, None)]  # (residual, LN, LN bias)


def _grid():
    """Every (shape, layout, dtype) twice, with activation / residual / LN / chunk cycled."""
    cases = []
    for i, (_, (D, e, depth), layout, dtype) in enumerate(
            itertools.product(range(2), SHAPES, LAYOUTS, DTYPES)):
        chunk, T = CHUNKS[i % len(CHUNKS)]
        residual, ln, bias = HEADS[(i // 3) % len(HEADS)]
        act = ("silu", "gelu")[(i // 2) % 2]
        cases.append((D, e * D, depth, act, residual, ln, bias, layout, dtype, chunk, T))
    # every head option with both activations at the default shape, every dtype
    for (residual, ln, bias), act, dtype in itertools.product(HEADS, ("silu", "gelu"), DTYPES):
        cases.append((64, 256, 2, act, residual, ln, bias, "chunk", dtype, 64, 192))
    return cases


GRID = _grid()


def _id(c):
    D, hid, depth, act, res, ln, bias, layout, dtype, chunk, T = c
    return (f"D{D}-h{hid}-L{depth}-{act}-{'res' if res else 'nores'}-"
            f"{'ln' + ('b' if bias else '') if ln else 'noln'}-{layout}-"
            f"{str(dtype).split('.')[-1]}-C{chunk}-T{T}")




def _case_inputs(case, B=2, H=3):
    D, hid, depth, act, residual, ln, bias, layout, dtype, chunk, T = case
    n_chunks = -(-T // chunk)
    lead = {"shared": (H,), "row": (B, H), "chunk": (B, H, n_chunks)}[layout]
    dims = [D] + [hid] * (depth - 1) + [D]
    weights = [torch.randn(*lead, a, b, device=DEV) / a ** 0.5
               for a, b in zip(dims[:-1], dims[1:])]
    x = torch.randn(B, T, H, D, device=DEV).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=DEV).to(dtype)
    lr = torch.rand(B, T, H, device=DEV) * 0.5
    gamma = (1 + 0.2 * torch.randn(H, D, device=DEV)) if ln else None
    beta = 0.2 * torch.randn(H, D, device=DEV) if (ln and bias) else None
    mem = dict(activation=act, residual=residual, ln_weight=gamma, ln_bias=beta)
    return x, k, v, lr, weights, mem, chunk


def _double(mem):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in mem.items()}


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_memory_forward_kernel_forward_and_backward(case):
    needs_kernels()
    x, _, _, _, weights, mem, chunk = _case_inputs(case)
    tol = TOL[x.dtype]
    cs = chunk if weights[0].dim() == 5 else None
    ln = [t for t in (mem["ln_weight"], mem["ln_bias"]) if t is not None]

    def run(xx, ws, lns, dtype, backend):
        m = dict(mem)
        it = iter(lns)
        if m["ln_weight"] is not None:
            m["ln_weight"] = next(it)
        if m["ln_bias"] is not None:
            m["ln_bias"] = next(it)
        return memory_forward(xx.to(dtype) if dtype else xx, tuple(ws), chunk_size=cs,
                              backend=backend, **m)
    leaves = _leaves([x, *weights, *ln])
    y = run(leaves[0], leaves[1:1 + len(weights)], leaves[1 + len(weights):], None, "cuda")
    ref_leaves = _leaves([x.double(), *(w.double() for w in weights), *(t.double() for t in ln)])
    y_ref = run(ref_leaves[0], ref_leaves[1:1 + len(weights)], ref_leaves[1 + len(weights):],
                None, "torch")
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err(y, y_ref) <= tol, ("y", rel_err(y, y_ref))
    cot = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y.double() * cot).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * cot).sum(), ref_leaves)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == leaves[i].dtype and a.shape == leaves[i].shape
        assert rel_err(a, b) <= tol, (i, rel_err(a, b))


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_memory_grad_kernel_forward_and_backward(case):
    needs_kernels()
    _, k, v, lr, weights, mem, chunk = _case_inputs(case)
    tol = TOL[k.dtype]
    ln = [t for t in (mem["ln_weight"], mem["ln_bias"]) if t is not None]

    def run(tensors, backend):
        kk, vv, ll, *rest = tensors
        ws = rest[:len(weights)]
        m = dict(mem)
        it = iter(rest[len(weights):])
        if m["ln_weight"] is not None:
            m["ln_weight"] = next(it)
        if m["ln_bias"] is not None:
            m["ln_bias"] = next(it)
        return memory_grad(kk, vv, ll, tuple(ws), chunk_size=chunk, backend=backend, **m)
    leaves = _leaves([k, v, lr, *weights, *ln])
    U = run(leaves, "cuda")
    ref_leaves = _leaves([t.double() for t in (k, v, lr, *weights, *ln)])
    U_ref = run(ref_leaves, "torch")
    for i, (a, b) in enumerate(zip(U, U_ref)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) <= tol, ("U", i, rel_err(a, b))
    cots = [torch.randn_like(u) for u in U_ref]
    grads = torch.autograd.grad(sum((u.double() * c).sum() for u, c in zip(U, cots)), leaves)
    grads_ref = torch.autograd.grad(sum((u * c).sum() for u, c in zip(U_ref, cots)), ref_leaves)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == leaves[i].dtype and a.shape == leaves[i].shape
        assert rel_err(a, b) <= tol, (i, rel_err(a, b))


WRITE_CASES = [c for c in GRID if c[7] == "chunk"][::3]


@pytest.mark.parametrize("case", WRITE_CASES, ids=[_id(c) for c in WRITE_CASES])
def test_memory_mlp_kernel_writes_every_element(case):
    """NaN-poisoned outputs of every mode come back finite (every element written)."""
    needs_kernels()
    x, k, v, lr, weights, mem, chunk = _case_inputs(case)
    T = x.shape[1]
    common = dict(activation=mem["activation"], residual=mem["residual"],
                  ln_weight=mem["ln_weight"], ln_bias=mem["ln_bias"], ln_eps=1e-6)
    n_chunks, n_sub = mlp_ops._tiling(T, chunk)
    B, _, H, D = x.shape
    depth, hidden = len(weights), weights[0].shape[-1]
    nan = float("nan")
    f32 = dict(device=DEV, dtype=torch.float32)
    u_shapes = [(B, H, n_chunks * n_sub, D, hidden)] + \
        ([(B, H, n_chunks * n_sub, hidden, D)] if depth == 2 else [])
    grad_u = [torch.randn(B, H, n_chunks, *w.shape[-2:], **f32) for w in weights]
    for mode in ("forward", "grad", "backward", "grad_backward"):
        out = {}
        if mode == "forward":
            out["y"] = torch.full_like(x, nan)
        else:
            for i, s in enumerate(u_shapes):
                out[f"u{i + 1}"] = torch.full(s, nan, **f32)
        if mode in ("backward", "grad_backward"):
            out["grad_x"] = torch.full_like(x, nan)
            if mem["ln_weight"] is not None:
                out["grad_ln"] = torch.full((B, H, n_chunks * n_sub, 2, D), nan, **f32)
        if mode == "grad_backward":
            out["grad_v"] = torch.full_like(x, nan)
            out["grad_lr"] = torch.full((B, T, H), nan, **f32)
        got = mlp_ops._launch(mode, k if mode.startswith("grad") else x, weights, chunk, v=v,
                              lr=lr, grad_y=torch.randn_like(x), grad_u=grad_u, out=out,
                              **common)
        for name in out:
            assert torch.isfinite(got[name]).all(), (mode, name)


def _default(dtype=torch.bfloat16, T=256, layout="chunk"):
    return _case_inputs((64, 256, 2, "silu", True, True, "bias", layout, dtype, 64, T))


def test_memory_mlp_kernels_are_deterministic():
    needs_kernels()
    x, k, v, lr, weights, mem, chunk = _default(layout="shared")
    leaves = _leaves([x, *weights])

    def once():
        y = memory_forward(leaves[0], tuple(leaves[1:]), backend="cuda", **mem)
        g = torch.autograd.grad((y.float() ** 2).sum(), leaves)
        U = memory_grad(k, v, lr, tuple(weights), chunk_size=chunk, backend="cuda", **mem)
        return [y, *g, *U]
    first, second = once(), once()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_memory_mlp_kernels_strided_inputs():
    """Non-contiguous x/k/v (a slice of a wider tensor, a transposed layout) give the same
    results as contiguous copies."""
    needs_kernels()
    x, k, v, lr, weights, mem, chunk = _default(T=130)
    wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], device=DEV).to(x.dtype)
    wide[..., 16:16 + x.shape[-1]] = x
    xs = wide[..., 16:16 + x.shape[-1]]
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs.is_contiguous() and not kt.is_contiguous()
    cs = chunk
    y1 = memory_forward(xs, tuple(weights), chunk_size=cs, backend="cuda", **mem)
    y2 = memory_forward(x, tuple(weights), chunk_size=cs, backend="cuda", **mem)
    assert torch.equal(y1, y2)
    U1 = memory_grad(kt, v, lr.transpose(0, 1).contiguous().transpose(0, 1), tuple(weights),
                     chunk_size=chunk, backend="cuda", **mem)
    U2 = memory_grad(k, v, lr, tuple(weights), chunk_size=chunk, backend="cuda", **mem)
    for a, b in zip(U1, U2):
        assert torch.equal(a, b)


def test_memory_mlp_cuda_graph_capture_and_replay():
    needs_kernels()
    x, k, v, lr, weights, mem, chunk = _default()
    mem = dict(mem)
    static = [x.clone(), k.clone(), v.clone(), lr.clone()]

    def step():
        y = memory_forward(static[0], tuple(weights), chunk_size=chunk, backend="cuda", **mem)
        U = memory_grad(static[1], static[2], static[3], tuple(weights), chunk_size=chunk,
                        backend="cuda", **mem)
        return y, U
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g, U_g = step()
    new = _default()
    for dst, src in zip(static, new[:4]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    y_e, U_e = step()
    assert torch.equal(y_g, y_e)
    for a, b in zip(U_g, U_e):
        assert torch.equal(a, b)


def test_memory_mlp_torch_compile_fullgraph():
    needs_kernels()
    x, k, v, lr, weights, mem, chunk = _default()

    def fn(x, k, v, lr, w1, w2):
        y = memory_forward(x, (w1, w2), chunk_size=chunk, backend="cuda", **mem)
        U = memory_grad(k, v, lr, (w1, w2), chunk_size=chunk, backend="cuda", **mem)
        return y.float().sum() + U[0].sum() + U[1].sum()
    leaves = _leaves([x, k, v, lr, *weights])
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    eager_leaves = _leaves([x, k, v, lr, *weights])
    want = fn(*eager_leaves)
    grads_want = torch.autograd.grad(want, eager_leaves)
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(grads, grads_want):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("which", ["forward", "grad"])
def test_opcheck_memory_mlp_ops_on_gpu(which):
    needs_kernels()
    x, k, v, lr, weights, mem, chunk = _default(T=96)
    kw = (mem["ln_weight"], mem["ln_bias"])
    if which == "forward":
        args = (x.requires_grad_(), [w.requires_grad_() for w in weights], *kw, chunk,
                mem["activation"], mem["residual"], 1e-6, [])
        torch.library.opcheck(mlp_ops.memory_forward_op, args)
    else:
        args = (k, v, lr.requires_grad_(), [w.requires_grad_() for w in weights], *kw, chunk,
                mem["activation"], mem["residual"], 1e-6)
        torch.library.opcheck(mlp_ops.memory_grad_op, args)


def test_python_support_rule_matches_the_extension():
    needs_kernels()
    for D, hidden, depth in itertools.product((8, 16, 24, 32, 64, 96, 128, 256),
                                              (8, 16, 24, 48, 64, 96, 512), (1, 2, 3)):
        assert mlp_ops.shape_supported(D, hidden, depth) == \
            _lib._C.memory_mlp_supported(dim=D, hidden=hidden, depth=depth), (D, hidden, depth)
    assert mlp_ops.TILE_ROWS == _lib._C.memory_mlp_tile_rows()


@pytest.mark.parametrize("first_lead", ["shared", "row"])
@pytest.mark.parametrize("chunk,T", [(64, 200), (128, 300), (16, 40)])
def test_memory_forward_kernel_shifted_read(first_lead, chunk, T):
    """The parallel variant's read on the kernel (chunk j with W_{j-1}, chunk 0 with the first
    weights) equals the kernel on concatenated weights, forward and every gradient, bitwise
    for y and dx and to fp32 summation order for the weight gradients."""
    needs_kernels()
    x, _, _, _, weights, mem, _ = _case_inputs((64, 128, 2, "gelu", True, True, "bias", "chunk",
                                                torch.bfloat16, chunk, T))
    B, _, H, _ = x.shape
    lead = (H,) if first_lead == "shared" else (B, H)
    firsts = [torch.randn(*lead, *w.shape[-2:], device=DEV) / w.shape[-2] ** 0.5
              for w in weights]
    gl, bl = mem["ln_weight"], mem["ln_bias"]
    leaves = _leaves([x, *weights, *firsts])
    y = mlp_ops.memory_forward_op(leaves[0], leaves[1:3], gl, bl, chunk, mem["activation"],
                                  True, 1e-6, leaves[3:])
    cat_leaves = _leaves([x, *weights, *firsts])
    cat = [torch.cat([f.expand(B, H, *f.shape[-2:]).unsqueeze(2), w[:, :, :-1]], dim=2)
           for f, w in zip(cat_leaves[3:], cat_leaves[1:3])]
    y_cat = mlp_ops.memory_forward_op(cat_leaves[0], cat, gl, bl, chunk, mem["activation"],
                                      True, 1e-6, [])
    assert torch.equal(y, y_cat)
    cot = torch.randn_like(y)
    g = torch.autograd.grad((y.float() * cot).sum(), leaves)
    g_cat = torch.autograd.grad((y_cat.float() * cot).sum(), cat_leaves)
    assert torch.equal(g[0], g_cat[0])
    for a, b in zip(g[1:], g_cat[1:]):
        assert rel_err(a, b) <= 1e-6


def test_every_kernel_fits_this_gpu_and_small_gpus_fall_back(monkeypatch):
    """Each compiled instance's shared memory fits this GPU (H100: 227 KiB); on a GPU with less
    (simulated: sm_86's 99 KiB), calls whose kernel would not fit run the reference, with the
    reason named, instead of failing at launch."""
    needs_kernels()
    limit = _lib.smem_per_block_optin(torch.cuda.current_device())
    sizes = {}
    for dtype, D, hidden, depth, mode in itertools.product(
            range(3), DIMS, (16, 32, 48, 64, 128, 256, 512), (1, 2), range(4)):
        sizes[dtype, D, hidden, depth, mode] = _lib._C.memory_mlp_smem_bytes(
            dtype=dtype, dim=D, hidden=hidden, depth=depth, mode=mode)
    assert all(0 < s <= limit for s in sizes.values()), max(sizes.values())
    assert _lib._C.memory_mlp_smem_bytes(dtype=0, dim=24, hidden=64, depth=2, mode=0) == 0
    # fp32 operands take more shared memory than bf16 ones
    assert sizes[2, 128, 512, 2, 3] > sizes[0, 128, 512, 2, 3]

    x, k, v, lr, weights, mem, chunk = _case_inputs((128, 128, 2, "silu", True, True, None,
                                                     "chunk", torch.float32, 64, 70))
    monkeypatch.setattr(_lib, "smem_per_block_optin", lambda index: 99 * 1024)
    reason = mlp_ops.kernel_reason(k, weights, second_order=True)
    assert reason is not None and "shared memory" in reason and "99 KiB" in reason
    with pytest.raises(RuntimeError, match="shared memory"):
        memory_grad(k, v, lr, tuple(weights), chunk_size=chunk, backend="cuda", **mem)
    with pytest.warns(RuntimeWarning, match="shared memory"):
        U = memory_grad(k, v, lr, tuple(weights), chunk_size=chunk, backend="auto", **mem)
    U_ref = memory_grad(k.double(), v.double(), lr.double(), tuple(w.double() for w in weights),
                        chunk_size=chunk, backend="torch", **_double(mem))
    for a, b in zip(U, U_ref):
        assert rel_err(a, b) <= 1e-5
