"""Op registration: torch.library.opcheck, fake tensors, torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import make_inputs, make_weights, rel_err
import titans_cuda
from titans_cuda import memory_forward, memory_grad, memory_scan, neural_memory


def _scan_args(dtype, with_s0, B=2, H=3, NC=5, E=12, broadcast_w0=True):
    U = torch.randn(B, H, NC, E, dtype=dtype)
    alpha, eta = torch.rand(B, NC, H, dtype=dtype), torch.rand(B, NC, H, dtype=dtype)
    w0 = torch.randn(H, E, dtype=dtype).expand(B, H, E) if broadcast_w0 \
        else torch.randn(B, H, E, dtype=dtype)
    s0 = torch.randn(B, H, E, dtype=dtype) if with_s0 else None
    return [U, alpha, eta, w0, s0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_s0", [False, True])
@pytest.mark.parametrize("broadcast_w0", [False, True])
def test_opcheck_memory_scan(dtype, with_s0, broadcast_w0):
    args = _scan_args(dtype, with_s0, broadcast_w0=broadcast_w0)
    for t in args:
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(torch.ops.titans_cuda.memory_scan.default, args)


@pytest.mark.parametrize("with_s0", [False, True])
def test_opcheck_memory_scan_backward_op(with_s0):
    U, alpha, eta, w0, s0 = _scan_args(torch.float64, with_s0)
    w_all, _ = torch.ops.titans_cuda.memory_scan(U, alpha, eta, w0, s0)
    args = [torch.randn_like(w_all), torch.randn_like(w0.contiguous()), U, alpha, eta, w0, s0,
            w_all]
    torch.library.opcheck(torch.ops.titans_cuda.memory_scan_bwd.default, args)
    d_u, d_f, d_m, d_w0, d_s0 = torch.ops.titans_cuda.memory_scan_bwd(*args)
    assert d_u.shape == U.shape and d_f.shape == alpha.shape and d_w0.shape == w0.shape
    if not with_s0:
        assert not d_s0.any()


def test_custom_op_backward_gradcheck():
    args = _scan_args(torch.float64, True, broadcast_w0=False)
    args = [t.requires_grad_(True) for t in args]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.titans_cuda.memory_scan(*a), args)


def test_custom_op_equals_reference_on_cpu():
    args = _scan_args(torch.float32, True)
    w, s = torch.ops.titans_cuda.memory_scan(*args)
    B, H, NC, E = args[0].shape
    w_ref, s_ref = memory_scan((args[0].view(B, H, NC, 3, 4),), args[1], args[2],
                               initial_weights=(args[3][0].reshape(H, 3, 4),),
                               initial_momentum=(args[4].view(B, H, 3, 4),), backend="torch")
    assert rel_err(w, w_ref[0].reshape(B, H, NC, E)) < 1e-6
    assert rel_err(s, s_ref[0].reshape(B, H, E)) < 1e-6


def test_fake_tensor_shapes():
    B, T, H, D, C = 2, 10, 3, 4, 4
    with FakeTensorMode():
        q, k, v = (torch.empty(B, T, H, D) for _ in range(3))
        lr, forget, momentum = (torch.empty(B, T, H) for _ in range(3))
        weights = (torch.empty(H, D, 8), torch.empty(H, 8, D))
        o, _ = neural_memory(q, k, v, lr, forget, momentum, weights, chunk_size=C)
        assert o.shape == (B, T, H, D)
        y = memory_forward(q, weights)
        assert y.shape == (B, T, H, D)
        U = memory_grad(k, v, lr, weights, chunk_size=C)
        assert [u.shape for u in U] == [(B, H, 3, D, 8), (B, H, 3, 8, D)]
        w_all, s_last = memory_scan(U, torch.empty(B, 3, H), torch.empty(B, 3, H),
                                    initial_weights=weights, backend="auto")
        assert [w.shape for w in w_all] == [(B, H, 3, D, 8), (B, H, 3, 8, D)]
        assert [s.shape for s in s_last] == [(B, H, D, 8), (B, H, 8, D)]
        fake_out = torch.ops.titans_cuda.memory_scan(*_scan_args(torch.float32, True))
        assert fake_out[0].shape == (2, 3, 5, 12)


def test_torch_compile_fullgraph_memory_scan_op():
    args = _scan_args(torch.float32, True)
    compiled = torch.compile(lambda *a: torch.ops.titans_cuda.memory_scan(*a), fullgraph=True,
                             backend="aot_eager")
    w, s = compiled(*args)
    w_ref, s_ref = torch.ops.titans_cuda.memory_scan(*args)
    assert torch.equal(w, w_ref) and torch.equal(s, s_ref)


def test_torch_compile_fullgraph_neural_memory_reference():
    B, T, H, D = 1, 9, 2, 4
    args = make_inputs(B, T, H, D, dtype=torch.float32)
    weights = make_weights(H, D, 8, 2, dtype=torch.float32)

    def fn(*a):
        return neural_memory(*a, weights, chunk_size=4, backend="torch")[0]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(*args), fn(*args)) < 1e-6


def test_info_on_this_machine():
    data = titans_cuda.info()
    assert data["titans_cuda"] == titans_cuda.__version__
    assert set(data["kernels"]) == {"memory_scan", "memory_forward", "memory_grad",
                                    "neural_memory", "parallel_neural_memory"}
    if not torch.cuda.is_available():
        assert data["devices"] == []
        assert data["kernels"]["memory_scan"].startswith("reference here")
    if not data["extension_loaded"]:
        assert data["extension_error"]


def _needs_extension():
    from titans_cuda import _lib
    if not _lib.extension_loaded():
        pytest.skip("the shared-memory plans come from the extension")


def test_info_lists_the_neural_memory_shapes_past_a_smaller_shared_memory():
    """What `python -m titans_cuda` reports per GPU: on an H100 (227 KiB) every chunked shape
    runs on the kernels; an A100 (163 KiB, no clusters) and a 99 KiB GPU lose the shapes whose
    plan (from the extension) exceeds their limit, and only those."""
    _needs_extension()
    import sys
    from titans_cuda import _lib
    info_mod = sys.modules["titans_cuda.info"]
    assert info_mod.neural_memory_past_smem(227 * 1024, True) == []
    a100 = info_mod.neural_memory_past_smem(163 * 1024, False)
    at = {(r["depth"], r["dim"], r["chunk_size"], r["part"]): r for r in a100}
    bwd = _lib._C.neural_memory_chunked_bwd_smem_bytes(dim=64, hidden=128, depth=2, chunk=64,
                                                        dtype=0)
    assert bwd > 163 * 1024
    assert at[(2, 64, 64, "backward")]["kib"] == -(-bwd // 1024)
    assert at[(2, 64, 64, "backward")]["why"] == f"{-(-bwd // 1024)} KiB"
    # the forward of the default shape fits an A100 (the one-CTA instance's larger plan is
    # taken only by sm_90..sm_11x binaries), and so does chunk 32's backward
    assert (2, 64, 64, "forward") not in at and (2, 64, 32, "backward") not in at
    assert at[(1, 128, 64, "backward")]["why"] == "thread-block clusters, sm_90+"
    for r in a100:
        assert r["why"].startswith("thread-block") or r["kib"] * 1024 > 163 * 1024, r
    small = {(r["depth"], r["dim"], r["chunk_size"], r["part"])
             for r in info_mod.neural_memory_past_smem(99 * 1024, False)}
    assert set(at) <= small
    assert (2, 64, 32, "forward") not in small and (2, 64, 64, "forward") in small


def test_python_m_titans_cuda_prints_the_shapes_past_shared_memory(capsys):
    _needs_extension()
    import sys
    from titans_cuda.__main__ import _print_info
    info_mod = sys.modules["titans_cuda.info"]
    data = titans_cuda.info()
    data["devices"] = [
        dict(index=0, name="A100", capability="sm_80", sms=108, memory_gib=79.2,
             kernels_run=True, why_not=None, smem_per_block_kib=163,
             neural_memory_past_smem=info_mod.neural_memory_past_smem(163 * 1024, False)),
        dict(index=1, name="H100", capability="sm_90", sms=132, memory_gib=79.2,
             kernels_run=True, why_not=None, smem_per_block_kib=227,
             neural_memory_past_smem=[])]
    _print_info(data)
    out = capsys.readouterr().out
    assert "163 KiB of shared memory per block: neural_memory (bf16/fp16) runs these" in out
    assert "depth 2, D 64, chunk_size 64: backward (needs 213 KiB)" in out
    assert "227 KiB of shared memory per block: every neural_memory chunked shape runs" in out


def test_python_m_titans_cuda_runs(capsys):
    from titans_cuda.__main__ import main
    assert main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "titans_cuda" in out and "memory_scan" in out


def test_check_rows_logic_on_cpu():
    """The comparison behind `python -m titans_cuda --check`, run with the fp32 reference on the
    CPU: every forward and backward row is computed, and fp32 lands within SPEC §7."""
    from titans_cuda.__main__ import scan_rows
    cases = [(1, 3, 7, 5, 3, False, True), (2, 2, 9, 8, 4, True, False),
             (2, 2, 0, 8, 8, True, False)]
    rows = scan_rows(torch.device("cpu"), "torch", cases)
    assert len(rows) == 2 * len(cases)
    assert any(name.startswith("memory_scan bwd") for name, _ in rows)
    for name, err in rows:
        assert err <= 1e-5, (name, err)


def test_mlp_check_rows_logic_on_cpu():
    """The memory-MLP rows of `--check`, with the reference on the CPU (the same rounded bf16 /
    fp16 inputs, computed in fp32): every row is computed and lands within its tolerance."""
    from titans_cuda.__main__ import _mlp_cases, mlp_rows
    cases = [c[:1] + (40,) + c[2:3] + (min(c[3], 32), min(c[4], 64)) + c[5:6] + (16,) + c[7:]
             for c in _mlp_cases()]
    rows = mlp_rows(torch.device("cpu"), "torch", cases)
    assert len(rows) == 4 * len(cases)
    for name, err, tol in rows:
        assert err <= tol, (name, err, tol)


def test_decode_check_rows_logic_on_cpu():
    """The decode rows of `--check`, with the fp32 reference on the CPU: every row computed
    and within its tolerance."""
    from titans_cuda.__main__ import _decode_cases, decode_rows
    rows = decode_rows(torch.device("cpu"), "torch", _decode_cases())
    assert len(rows) == 2 * len(_decode_cases())
    for name, err, tol in rows:
        assert err <= tol, (name, err, tol)


def test_chunked_check_rows_logic_on_cpu():
    """The chunked rows of `--check` (longer calls, held to the input dtype's bound for the
    state too), with the fp32 reference on the CPU."""
    from titans_cuda.__main__ import _chunked_cases, decode_rows
    cases = [c[:1] + (min(c[1], 40),) + c[2:] for c in _chunked_cases()]
    rows = decode_rows(torch.device("cpu"), "torch", cases, label="chunked")
    assert len(rows) == 2 * len(cases) and all(r[0].startswith("chunked") for r in rows)
    assert [r[2] for r in rows if "state" in r[0]] == [2e-2, 5e-3, 5e-3]
    for name, err, tol in rows:
        assert err <= tol, (name, err, tol)


# ---- the memory-MLP custom ops (their reference path on the CPU) ----

def _mlp_op_args(layout, ln, depth=2, B=2, T=10, H=2, D=4, hidden=8, C=4, dtype=torch.float64):
    from titans_cuda.ops.memory_mlp import ops as mlp_ops  # noqa: F401  (registers the ops)
    n_chunks = -(-T // C)
    lead = {"shared": (H,), "row": (B, H), "chunk": (B, H, n_chunks)}[layout]
    weights = list(make_weights(H, D, hidden, depth, dtype=dtype, lead=lead))
    x = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, D, dtype=dtype)
    lr = torch.rand(B, T, H, dtype=dtype)
    gamma = 1 + 0.1 * torch.randn(H, D, dtype=dtype) if ln else None
    beta = 0.1 * torch.randn(H, D, dtype=dtype) if ln else None
    return x, v, lr, weights, gamma, beta, C


@pytest.mark.parametrize("layout", ["shared", "row", "chunk"])
@pytest.mark.parametrize("ln", [False, True])
def test_opcheck_memory_forward_op(layout, ln):
    x, _, _, weights, gamma, beta, C = _mlp_op_args(layout, ln)
    args = (x.requires_grad_(), [w.requires_grad_() for w in weights],
            gamma if gamma is None else gamma.requires_grad_(),
            beta if beta is None else beta.requires_grad_(), C if layout == "chunk" else None,
            "gelu", True, 1e-6, [])
    torch.library.opcheck(torch.ops.titans_cuda.memory_forward.default, args)
    assert torch.autograd.gradcheck(
        lambda x_, *r: torch.ops.titans_cuda.memory_forward(
            x_, list(r[:len(weights)]), *(list(r[len(weights):]) + [None, None])[:2], *args[4:]),
        [x, *weights, *[t for t in (gamma, beta) if t is not None]])


@pytest.mark.parametrize("first_lead", ["shared", "row"])
def test_memory_forward_op_shifted_read(first_lead):
    """first_weights: chunk j reads weights[:, :, j - 1], chunk 0 the first weights; equal to
    concatenating them, gradients included (gradcheck and opcheck on the reference path)."""
    x, _, _, weights, gamma, beta, C = _mlp_op_args("chunk", True, T=11)
    B, H = x.shape[0], x.shape[2]
    lead = (H,) if first_lead == "shared" else (B, H)
    firsts = [torch.randn(*lead, *w.shape[-2:], dtype=w.dtype) for w in weights]
    leaves = [t.requires_grad_() for t in (x, *weights, *firsts)]
    y = torch.ops.titans_cuda.memory_forward(x, weights, gamma, beta, C, "silu", True, 1e-6,
                                             firsts)
    cat = [torch.cat([f.expand(B, H, *f.shape[-2:]).unsqueeze(2), w[:, :, :-1]], dim=2)
           for f, w in zip(firsts, weights)]
    y_cat = torch.ops.titans_cuda.memory_forward(x, cat, gamma, beta, C, "silu", True, 1e-6, [])
    assert torch.equal(y, y_cat)
    cot = torch.randn_like(y)
    g = torch.autograd.grad((y * cot).sum(), leaves)
    g_cat = torch.autograd.grad((y_cat * cot).sum(), leaves)
    for a, b in zip(g, g_cat):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert not g[2][:, :, -1].any()  # the last chunk's weights are read by nobody
    torch.library.opcheck(torch.ops.titans_cuda.memory_forward.default,
                          (x, weights, gamma, beta, C, "silu", True, 1e-6, firsts))
    assert torch.autograd.gradcheck(
        lambda x_, w1, w2, f1, f2: torch.ops.titans_cuda.memory_forward(
            x_, [w1, w2], gamma, beta, C, "gelu", False, 1e-6, [f1, f2]), leaves)


@pytest.mark.parametrize("layout", ["shared", "row", "chunk"])
@pytest.mark.parametrize("ln", [False, True])
def test_opcheck_memory_grad_op(layout, ln):
    x, v, lr, weights, gamma, beta, C = _mlp_op_args(layout, ln, T=9)
    args = (x.requires_grad_(), v.requires_grad_(), lr.requires_grad_(),
            [w.requires_grad_() for w in weights],
            gamma if gamma is None else gamma.requires_grad_(),
            beta if beta is None else beta.requires_grad_(), C, "silu", False, 1e-6)
    torch.library.opcheck(torch.ops.titans_cuda.memory_grad.default, args)


def test_memory_mlp_ops_equal_the_reference_on_cpu():
    from titans_cuda.ops.memory_mlp import reference as ref
    x, v, lr, weights, gamma, beta, C = _mlp_op_args("chunk", True, T=11)
    y = torch.ops.titans_cuda.memory_forward(x, weights, gamma, beta, C, "silu", True, 1e-6, [])
    y_ref = ref.memory_forward(x, weights, chunk_size=C, activation="silu", residual=True,
                               ln_weight=gamma, ln_bias=beta)
    assert torch.equal(y, y_ref)
    U = torch.ops.titans_cuda.memory_grad(x, v, lr, weights, gamma, beta, C, "silu", True, 1e-6)
    U_ref = ref.memory_grad(x, v, lr, weights, chunk_size=C, activation="silu", residual=True,
                            ln_weight=gamma, ln_bias=beta)
    for a, b in zip(U, U_ref):
        assert torch.equal(a, b)


def test_memory_grad_op_second_order_gradcheck():
    """memory_grad's backward op (the reference's graph) against finite differences."""
    x, v, lr, weights, gamma, beta, C = _mlp_op_args("row", True, T=7, D=4, hidden=4)
    leaves = [t.requires_grad_() for t in (x, v, lr, *weights, gamma, beta)]

    def fn(x_, v_, lr_, w1, w2, g, b):
        return tuple(torch.ops.titans_cuda.memory_grad(x_, v_, lr_, [w1, w2], g, b, C, "gelu",
                                                       True, 1e-6))
    assert torch.autograd.gradcheck(fn, leaves)


def test_memory_mlp_fake_tensor_shapes():
    x, v, lr, weights, gamma, beta, C = _mlp_op_args("chunk", True, dtype=torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fx = torch.empty_like(x)
        y = torch.ops.titans_cuda.memory_forward(fx, weights, gamma, beta, C, "silu", False,
                                                 1e-6, [])
        U = torch.ops.titans_cuda.memory_grad(fx, v, lr, weights, gamma, beta, C, "silu", False,
                                              1e-6)
    assert y.shape == x.shape
    assert [tuple(u.shape) for u in U] == [tuple(w.shape) for w in weights]


def _decode_op_args(dtype=torch.float64, with_state=True, T=3, C=4, N=2, H=2, D=4, hidden=8):
    from titans_cuda import MemoryState
    q, k, v, lr, forget, momentum = make_inputs(N, T, H, D, dtype=dtype)
    weights = make_weights(H, D, hidden, 2, dtype=dtype)
    gamma, beta = 1 + 0.1 * torch.randn(H, D, dtype=dtype), 0.1 * torch.randn(H, D, dtype=dtype)
    st = None
    if with_state:
        w = [t.unsqueeze(0).expand(N, *t.shape) + 0.1 * torch.randn(N, *t.shape, dtype=dtype)
             for t in weights]
        st = MemoryState(tuple(w), tuple(0.1 * torch.randn_like(t) for t in w),
                         tuple(t + 0.1 * torch.randn_like(t) for t in w),
                         torch.tensor([C - 1, 1][:N]))
    leaves = [t.requires_grad_() for t in (q, k, v, lr, forget, momentum)]
    lists = [[t.requires_grad_() for t in getattr(st, f)] if st else []
             for f in ("weights", "momentum", "chunk_weights")]
    args = (*leaves, [w.requires_grad_() for w in weights], gamma.requires_grad_(),
            beta.requires_grad_(), *lists, st.offset if st else None, C, "gelu", True, 1e-6,
            "token")
    return args, st


@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck_neural_memory_decode_op(with_state):
    """The decode op's registration (fake, autograd through the reference's VJP, schema) on
    the CPU, where it runs the reference."""
    args, _ = _decode_op_args(with_state=with_state)
    torch.library.opcheck(torch.ops.titans_cuda.neural_memory_decode.default, args)


def test_neural_memory_decode_op_gradcheck_and_reference():
    """Outputs equal the reference's (o and the final state) and gradients (inputs, weights,
    LayerNorm, every initial-state tensor) pass finite differences."""
    from titans_cuda.ops.neural_memory import ops as nm_ops
    args, st = _decode_op_args(T=2, C=2, D=4, hidden=4)
    outs = torch.ops.titans_cuda.neural_memory_decode(*args)
    o, st_ref = neural_memory(*args[:6], tuple(args[6]), initial_state=st, chunk_size=2,
                              activation="gelu", residual=True, ln_weight=args[7],
                              ln_bias=args[8], output_final_state=True, backend="torch")
    for a, b in zip(outs, (o, *st_ref.weights, *st_ref.momentum, *st_ref.chunk_weights)):
        assert torch.equal(a, b)
    o_api, st_api = nm_ops.decode(*args[:6], args[6], chunk_size=2, activation="gelu",
                                  residual=True, ln_weight=args[7], ln_bias=args[8], ln_eps=1e-6,
                                  read="token", initial_state=st)
    assert torch.equal(o_api, o) and torch.equal(st_api.offset, st_ref.offset)
    tensors = [*args[:6], *args[6], args[7], args[8], *args[9], *args[10], *args[11]]

    def fn(*ts):
        q, k, v, lr, fo, mo, w1, w2, g, b, *rest = ts
        return tuple(torch.ops.titans_cuda.neural_memory_decode(
            q, k, v, lr, fo, mo, [w1, w2], g, b, rest[0:2], rest[2:4], rest[4:6], st.offset, 2,
            "gelu", True, 1e-6, "token"))
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck_neural_memory_chunked_op(with_state):
    """The chunked op's registration (fake, autograd through the reference's VJP, schema) on
    the CPU, with cu_seqlens packing two sequences of 5 and 2 tokens."""
    args, _ = _decode_op_args(with_state=with_state, T=7, N=1)
    if with_state:  # one state row per packed sequence
        args = list(args)
        for i in (9, 10, 11):
            args[i] = [torch.cat([t, t.flip(0)]).detach().requires_grad_() for t in args[i]]
        args[12] = torch.tensor([3, 1])
    cu = torch.tensor([0, 5, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.titans_cuda.neural_memory_chunked.default, (*args, cu, 0))


def test_neural_memory_chunked_op_gradcheck_and_reference():
    """Packed sequences through the chunked op: outputs equal the reference's, the returned
    offsets count each sequence, and gradients pass finite differences."""
    from titans_cuda import MemoryState
    from titans_cuda.ops.neural_memory import ops as nm_ops
    args, st = _decode_op_args(T=5, N=1, C=2, D=4, hidden=4)
    st = MemoryState(*(tuple(torch.cat([t, t.flip(0)]).detach() for t in f)
                       for f in (st.weights, st.momentum, st.chunk_weights)),
                     torch.tensor([1, 0]))
    args = list(args)
    args[9:13] = [list(st.weights), list(st.momentum), list(st.chunk_weights), st.offset]
    args[13] = 2
    cu = torch.tensor([0, 3, 5])
    outs = torch.ops.titans_cuda.neural_memory_chunked(*args, cu, 0)
    o, st_ref = neural_memory(*args[:6], tuple(args[6]), initial_state=st, chunk_size=2,
                              activation="gelu", residual=True, ln_weight=args[7],
                              ln_bias=args[8], output_final_state=True, cu_seqlens=cu,
                              backend="torch")
    for a, b in zip(outs, (o, *st_ref.weights, *st_ref.momentum, *st_ref.chunk_weights)):
        assert torch.equal(a, b)
    o_api, st_api = nm_ops.fused(*args[:6], args[6], chunk_size=2, activation="gelu",
                                 residual=True, ln_weight=args[7], ln_bias=args[8], ln_eps=1e-6,
                                 read="token", initial_state=st, cu_seqlens=cu,
                                 kernel="chunked")
    assert torch.equal(o_api, o) and st_api.offset.tolist() == st_ref.offset.tolist() == [0, 0]
    tensors = [*args[:6], *args[6], args[7], args[8], *[t.requires_grad_() for t in
                                                        (*st.weights, *st.momentum,
                                                         *st.chunk_weights)]]

    def fn(*ts):
        q, k, v, lr, fo, mo, w1, w2, g, b, *rest = ts
        return tuple(torch.ops.titans_cuda.neural_memory_chunked(
            q, k, v, lr, fo, mo, [w1, w2], g, b, rest[0:2], rest[2:4], rest[4:6], st.offset, 2,
            "gelu", True, 1e-6, "token", cu, 0))
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("op", ["decode", "chunked"])
def test_backward_ops_take_an_empty_cotangent_as_zeros(op):
    """The autograd formula hands an output without a cotangent to the backward op as an empty
    tensor (no zeros of the states' shape on the kernel path); the ops must read it as zeros."""
    args, _ = _decode_op_args(T=5, C=2, D=4, hidden=4)
    args = [a.detach() if isinstance(a, torch.Tensor) else
            [t.detach() for t in a] if isinstance(a, list) else a for a in args]
    extra = (None, 0, []) if op == "chunked" else ()
    fwd = getattr(torch.ops.titans_cuda, f"neural_memory_{op}")
    bwd = getattr(torch.ops.titans_cuda, f"neural_memory_{op}_bwd")
    outs = fwd(*args, *extra[:2])[:7]  # o, then W, S, CW per layer
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in outs]
    for none in ([3, 4, 5, 6], [1, 2, 5, 6]):  # S and CW without a cotangent; W and CW
        zeros = [torch.zeros_like(t) if i in none else t for i, t in enumerate(full)]
        empty = [t.new_empty(0) if i in none else t for i, t in enumerate(full)]
        a = bwd(zeros, *args, *extra)
        b = bwd(empty, *args, *extra)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        assert any(x.abs().sum() > 0 for x in a)


def _fused_call(kernel, with_state, ln, cot_states, direct, monkeypatch):
    """nm_ops.fused on CPU (the reference inside either path): o, final state and gradients
    of <o, R> + the chosen state outputs' <s, R_s>, through _Direct or through the ops."""
    from titans_cuda import MemoryState
    from titans_cuda.ops.neural_memory import ops as nm_ops
    monkeypatch.setattr(nm_ops, "EAGER_DIRECT", direct)
    torch.manual_seed(0)
    T, N = (3, 2) if kernel == "decode" else (7, 1)
    args, st = _decode_op_args(T=T, N=N, with_state=with_state, C=2, D=4, hidden=4)
    cu = torch.tensor([0, 5, 7]) if kernel == "chunked" else None
    if with_state and kernel == "chunked":  # one state row per packed sequence
        st = MemoryState(*(tuple(torch.cat([t, t.flip(0)]).detach().requires_grad_() for t in f)
                           for f in (st.weights, st.momentum, st.chunk_weights)),
                         torch.tensor([1, 0]))
    leaves = [*args[:6], *args[6], args[7], args[8]]
    if st is not None:
        leaves += [*st.weights, *st.momentum, *st.chunk_weights]
    o, out = nm_ops.fused(*args[:6], args[6], chunk_size=2, activation="gelu", residual=True,
                          ln_weight=args[7] if ln else None, ln_bias=args[8] if ln else None,
                          ln_eps=1e-6, read="token", initial_state=st, cu_seqlens=cu,
                          kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for field in cot_states:
        for t in getattr(out, field):
            loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o, *out.weights, *out.momentum, *out.chunk_weights, out.offset], grads


@pytest.mark.parametrize("kernel", ["decode", "chunked"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("cot_states", [(), ("weights",), ("momentum", "chunk_weights"),
                                        ("weights", "momentum", "chunk_weights")])
def test_eager_direct_path_equals_the_ops(kernel, with_state, cot_states, monkeypatch):
    """Eager calls take the ops' implementations through _Direct, not the dispatcher: the
    outputs, the final state and every gradient (cotangents on o and on none, some or all of
    the returned state) equal the registered ops' bit for bit, LayerNorm on and off."""
    for ln in (True, False):
        outs_d, g_d = _fused_call(kernel, with_state, ln, cot_states, True, monkeypatch)
        outs_o, g_o = _fused_call(kernel, with_state, ln, cot_states, False, monkeypatch)
        for a, b in zip(outs_d, outs_o):
            assert torch.equal(a, b)
        assert len(g_d) == len(g_o)
        for i, (a, b) in enumerate(zip(g_d, g_o)):
            assert (a is None) == (b is None), i
            if a is not None:
                assert torch.equal(a, b), i
        assert any(g is not None and g.abs().sum() > 0 for g in g_d)


def test_eager_direct_path_is_taken_only_for_plain_eager_calls(monkeypatch):
    """_direct: plain tensors in eager mode; not under a dispatch mode (FakeTensor), a
    torch.func transform, for tensor subclasses, or with TITANS_EAGER_DIRECT off (the switch
    read into EAGER_DIRECT)."""
    from titans_cuda.ops.neural_memory import ops as nm_ops
    x, p = torch.randn(2, 3), torch.nn.Parameter(torch.randn(2))
    assert nm_ops._direct([x, p, None])
    with FakeTensorMode():
        assert not nm_ops._direct([x])
    seen = []
    torch.func.grad(lambda t: (seen.append(nm_ops._direct([t])), t.sum())[1])(torch.randn(3))
    assert seen == [False]

    class Sub(torch.Tensor):
        pass
    assert not nm_ops._direct([x.as_subclass(Sub)])
    monkeypatch.setattr(nm_ops, "EAGER_DIRECT", False)
    assert not nm_ops._direct([x])


def test_eager_direct_path_refuses_double_backward():
    """The ops have no second derivative; neither has _Direct (once_differentiable)."""
    args, st = _decode_op_args(T=3, C=2, D=4, hidden=4)
    from titans_cuda.ops.neural_memory import ops as nm_ops
    o, _ = nm_ops.fused(*args[:6], args[6], chunk_size=2, activation="gelu", residual=True,
                        ln_weight=args[7], ln_bias=args[8], ln_eps=1e-6, read="token",
                        initial_state=st, kernel="decode")
    (g,) = torch.autograd.grad(o.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), args[0])


def test_fused_backward_rule_and_checkpoints_by_depth():
    """The fused backward's shape rule in Python (chunked_bwd_shape_supported) is the
    extension's (neural_memory_chunked_bwd_supported, a host function: checked wherever the
    extension is built, no GPU needed), depth 1 included; depth 1 keeps every chunk's start
    state (K = 1) where depth 2 keeps every K-th; the shared memory and scratch of depth 1."""
    from titans_cuda import _lib
    from titans_cuda.ops.neural_memory import ops as nm_ops
    q = torch.zeros(1, 8, 2, 64)
    w1 = make_weights(2, 64, 64, 1)
    w2 = make_weights(2, 64, 128, 2)
    assert nm_ops._kept_every(q, w1, 64, None, None, "token", 4, bwd_reason=None) == 1
    assert nm_ops._kept_every(q, w2, 64, None, None, "token", 4, bwd_reason=None) == 4
    assert nm_ops._kept_every(q, w1, 64, None, None, "token", 4, bwd_reason="no") == 0
    cases = [(d, hid, depth, c, read) for d in (16, 32, 64, 128) for hid in (d, 96, 128, 520)
             for depth in (1, 2) for c in (8, 16, 32, 64, 128) for read in ("token", "chunk")]
    want = {c: nm_ops.chunked_bwd_shape_supported(*c) for c in cases}
    assert want[(64, 64, 1, 64, "chunk")] and not want[(128, 128, 1, 64, "token")]
    assert want[(128, 128, 1, 32, "token")] and want[(128, 128, 1, 16, "chunk")]
    assert not want[(64, 96, 1, 64, "token")]  # depth 1 has no hidden width but D
    if _lib._C is None:
        pytest.skip("the extension is not built here")
    for (d, hid, depth, c, read), ok in want.items():
        for dtype in (0, 1, 2):
            got = _lib._C.neural_memory_chunked_bwd_supported(
                dim=d, hidden=hid, depth=depth, chunk=c, dtype=dtype, read_chunk=read == "chunk")
            # fp32 inputs: depth 1 only
            assert got == (ok and (dtype < 2 or depth == 1)), (d, hid, depth, c, read, dtype)
    # depth 1 at D 64, C 64, one CTA: five C x D, five D x D and three C x C fp32 matrices with
    # odd row strides, 17 row vectors (the keys' rstd among them) and the warps' partials,
    # within an H100's 227 KiB; the scratch holds e and xhat (C x D each)
    smem = _lib._C.neural_memory_chunked_bwd_smem_bytes(dim=64, hidden=64, depth=1, chunk=64,
                                                        dtype=0)
    assert smem == 4 * (13 * 64 * 65 + 17 * 64 + 32) <= 227 * 1024
    assert _lib._C.neural_memory_chunked_bwd_scratch_floats(dim=64, hidden=64, depth=1,
                                                            chunk=64) == 2 * 64 * 64
    # D 128, C 32: a cluster of 4's CTA, 32 columns of W each: q, k (C x D), three C x 32 and
    # five D x 32 matrices, three C x C, the row vectors and partials, and the exchange's two
    # C x D buffers (q̄ / k̄)
    smem = _lib._C.neural_memory_chunked_bwd_smem_bytes(dim=128, hidden=128, depth=1, chunk=32,
                                                        dtype=0)
    assert smem == 4 * (2 * 32 * 129 + 3 * 32 * 33 + 5 * 128 * 33 + 3 * 32 * 33 + 17 * 32 + 32
                        + 2 * 32 * 128) <= 227 * 1024


def test_sub_chunks_where_a_call_chunk_has_no_plan_that_fits():
    """fwd_chunking / bwd_chunking: a call chunk runs as R sub-chunks exactly where its own
    shared-memory plan does not fit an H100's 227 KiB and the sub-chunk's does (the backward
    with either read; a depth-1 forward that keeps checkpoints walks the backward's
    sub-chunks); elsewhere it runs as itself."""
    from titans_cuda import _lib
    from titans_cuda.ops.neural_memory import ops as nm_ops
    f32 = torch.float32
    assert nm_ops.fwd_chunking(64, 2, 128) == (64, 2)
    assert nm_ops.fwd_chunking(128, 2, 128) == (64, 2)
    assert nm_ops.fwd_chunking(32, 2, 128) == (128, 1)  # its own plan fits
    assert nm_ops.fwd_chunking(64, 1, 128) == (128, 1) and nm_ops.fwd_chunking(64, 2, 64) == (64, 1)
    assert nm_ops.fwd_chunking(128, 1, 128) == (32, 4)
    assert nm_ops.fwd_chunking(128, 1, 64) == (64, 1)
    assert nm_ops.bwd_chunking(64, 128) == (64, 2)
    assert nm_ops.bwd_chunking(32, 128) == (64, 2)
    assert nm_ops.bwd_chunking(128, 64) == (32, 2)
    assert nm_ops.bwd_chunking(128, 128) == (32, 4)
    assert nm_ops.bwd_chunking(128, 32) == (32, 1)
    assert nm_ops.bwd_chunking(64, 64) == (64, 1)
    # fp32 at depth 1: the fp32 forward (chunks up to 64) walks chunk 128 as sub-chunks too
    assert nm_ops.fwd_chunking(64, 1, 128, f32) == (64, 2)
    assert nm_ops.fwd_chunking(128, 1, 64, f32) == (64, 1)
    assert nm_ops._ckpt_chunking(128, 1, 64, f32) == (32, 2)
    assert nm_ops._ckpt_chunking(64, 1, 128, torch.bfloat16) == (64, 2)
    assert nm_ops._ckpt_chunking(64, 2, 128, torch.bfloat16) == (64, 2)
    assert nm_ops._ckpt_chunking(32, 2, 128, torch.bfloat16) == (128, 1)
    # depth 1 keeps every sub-chunk's start state (an open call chunk's offset: up to C - 1)
    assert nm_ops._checkpoint_shape(300, 128, 1, False, 2) == (5,)
    assert nm_ops._checkpoint_shape(300, 128, 1, True, 2) == (7,)
    assert nm_ops._checkpoint_shape(300, 128, 4, False) == (1,)
    for D in (32, 64, 128):
        for C in (16, 32, 64, 128):
            kc, r = nm_ops.bwd_chunking(D, C)
            assert C % kc == 0 and C // kc == r
            for read in ("token", "chunk"):
                assert nm_ops.chunked_bwd_shape_supported(D, D, 1, kc, read), (D, C, read)
                assert (r > 1) == (not nm_ops.chunked_bwd_shape_supported(D, D, 1, C, read))
    if _lib._C is None:
        pytest.skip("the extension is not built here")
    limit = 227 * 1024
    for D in (32, 64, 128):
        for C in (16, 32, 64, 128):
            kc, r = nm_ops.fwd_chunking(D, 2, C)
            own = _lib._C.neural_memory_chunked_smem_bytes(dim=D, hidden=256, depth=2, chunk=C,
                                                            dtype=0)
            sub = _lib._C.neural_memory_chunked_smem_bytes(dim=D, hidden=256, depth=2, chunk=kc,
                                                            dtype=0)
            assert sub <= limit and (r > 1) == (own > limit), (D, C)
            kc, r = nm_ops.bwd_chunking(D, C)
            for read in ("token", "chunk"):
                assert nm_ops.chunked_bwd_shape_supported(D, 256, 2, kc, read), (D, C, read)
                assert (r > 1) == (not nm_ops.chunked_bwd_shape_supported(D, 256, 2, C, read))
            assert _lib._C.neural_memory_chunked_bwd_smem_bytes(dim=D, hidden=256, depth=2,
                                                                chunk=kc, dtype=0) <= limit
            # depth 1 (the same sub-chunk kc): the backward's fits, and so does the forward
            # that walks it
            assert _lib._C.neural_memory_chunked_bwd_smem_bytes(dim=D, hidden=D, depth=1,
                                                                chunk=kc, dtype=0) <= limit
            assert 0 < _lib._C.neural_memory_chunked_smem_bytes(dim=D, hidden=D, depth=1,
                                                                 chunk=kc, dtype=0) <= limit


def test_qkv_rows_are_16_byte_aligned_for_the_kernels():
    """_qkv (neural_memory's kernel path) keeps q / k / v whose rows start 16-byte aligned and
    copies the others, so no kernel load is misaligned (SPEC §6: nothing may crash; the bf16
    chunked kernel copies rows by 16-byte cp.async): a feature slice at an even offset that is
    not 16 bytes is copied, a 16-byte one and a transposed view are not."""
    from titans_cuda.ops.neural_memory.ops import _qkv
    for dtype in (torch.float32, torch.bfloat16):
        wide = torch.randn(2, 10, 3, 72).to(dtype)
        step = 16 // wide.element_size()
        odd, even = wide[..., 2:66], wide[..., step:step + 64]
        assert wide.data_ptr() % 16 == 0
        assert _qkv(odd).data_ptr() != odd.data_ptr() and torch.equal(_qkv(odd), odd)
        assert _qkv(odd).data_ptr() % 16 == 0
        assert _qkv(even).data_ptr() == even.data_ptr()
        moved = torch.randn(2, 3, 10, 64).to(dtype).transpose(1, 2)
        assert _qkv(moved).data_ptr() == moved.data_ptr()
        # heads 66 elements apart: rows start at even offsets that are not all 16-byte aligned
        odd_rows = torch.randn(2, 10, 198).to(dtype).as_strided((2, 10, 3, 64),
                                                                (1980, 198, 66, 1))
        assert _qkv(odd_rows).is_contiguous() and torch.equal(_qkv(odd_rows), odd_rows)
