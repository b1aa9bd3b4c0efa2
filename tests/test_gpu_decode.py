"""GPU tests of the streaming-decode kernel (neural_memory for calls of at most DECODE_MAX_T
tokens; marked ``gpu``, skipped without CUDA): outputs and the whole final state against the
float64 reference on the same rounded inputs within SPEC §7, over a grid of every option the
kernel takes (D, expansion, depth, dtype, activation, residual, LayerNorm +- bias, both reads,
with and without an initial state, offsets that open / continue / close chunks, chunk sizes
1..64, alpha = 1 resets); any-split streaming equality; gradients (through the reference);
full writes, determinism, CUDA graphs, torch.compile and opcheck on the kernel path."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_inputs, make_weights, needs_kernels, rel_err
from titans_cuda import MemoryState, _lib, neural_memory
from titans_cuda.ops.neural_memory import ops as nm_ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}
# The state is fp32 math on the rounded inputs whatever their dtype, so it is held to fp32's
# 1e-5, or to twice the fp32 reference's own error where a draw is ill-conditioned (LayerNorm
# of an almost erased memory, README: precision), as tests/test_gpu.py does.
STATE_TOL = 1e-5

SHAPES = [(D, e, 2) for D in (16, 32, 64, 128) for e in (1, 2, 4)] + \
    [(D, 1, 1) for D in (16, 32, 64, 128)]  # 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (T, chunk, state): state None = from the weights; "open" = a random state with offsets
# spread over [0, C) (chunks continuing, closing within the call, starting)
CALLS = [(1, 64, "open"), (1, 4, "open"), (5, 4, "open"), (3, 1, "open"), (16, 16, None),
         (2, 2, "open"), (7, 64, None), (4, 3, "open")]
HEADS = [(False, False, None), (True, True, "bias"), (True, False, None), (False, True, None)]


def _grid():
    cases = []
    for i, ((D, e, depth), dtype) in enumerate(itertools.product(SHAPES, DTYPES)):
        for j in range(2):
            T, C, state = CALLS[(2 * i + j) % len(CALLS)]
            residual, ln, bias = HEADS[(i + j) % len(HEADS)]
            act = ("silu", "gelu")[(i + j) % 2]
            read = ("token", "chunk")[(i // 2 + j) % 2]
            cases.append((D, e * D, depth, dtype, act, residual, ln, bias, read, T, C, state))
    return cases


GRID = _grid()


def _id(c):
    D, hid, depth, dtype, act, res, ln, bias, read, T, C, state = c
    return (f"D{D}-h{hid}-L{depth}-{str(dtype).split('.')[-1]}-{act}-"
            f"{'res' if res else 'nores'}-{'ln' + ('b' if bias else '') if ln else 'noln'}-"
            f"{read}-T{T}-C{C}-{state or 'fresh'}")




def _random_state(N, H, weights, C):
    """A state as a previous call leaves it: W, S, chunk weights all different, offsets over
    [0, C) with C - 1 (the next token closes the chunk) and 0 (it opens one) included."""
    w = tuple(t.unsqueeze(0).expand(N, *t.shape) + 0.1 * torch.randn(N, *t.shape, device=DEV)
              for t in weights)
    s = tuple(0.05 * torch.randn_like(t) for t in w)
    cw = tuple(t + 0.05 * torch.randn_like(t) for t in w)
    off = torch.randint(0, C, (N,), device=DEV)
    off[0] = C - 1
    if N > 1:
        off[1] = 0
    return MemoryState(w, s, cw, off.long())


def _case(case, N=3, H=2):
    D, hid, depth, dtype, act, residual, ln, bias, read, T, C, state = case
    q, k, v, lr, forget, momentum = make_inputs(N, T, H, D, dtype=torch.float32, device=DEV)
    if T == 1:
        forget[1, 0, 0] = 1.0  # an exact reset in a one-token call too
    weights = make_weights(H, D, hid, depth, dtype=torch.float32, device=DEV)
    st = _random_state(N, H, weights, C) if state == "open" else None
    mem = dict(chunk_size=C, activation=act, residual=residual, read=read,
               ln_weight=(1 + 0.2 * torch.randn(H, D, device=DEV)) if ln else None,
               ln_bias=(0.2 * torch.randn(H, D, device=DEV)) if ln and bias else None)
    return [t.to(dtype) for t in (q, k, v)] + [lr, forget, momentum], weights, st, mem


def _op_args(args, weights, st, mem):
    """The positional arguments of decode_op (and of nm_ops._launch)."""
    lists = [[] if st is None else list(getattr(st, f))
             for f in ("weights", "momentum", "chunk_weights")]
    return (*args, list(weights), mem["ln_weight"], mem["ln_bias"], *lists,
            None if st is None else st.offset, mem["chunk_size"], mem["activation"],
            mem["residual"], 1e-6, mem["read"])


def _double_state(st):
    if st is None:
        return None
    return MemoryState(tuple(t.double() for t in st.weights),
                       tuple(t.double() for t in st.momentum),
                       tuple(t.double() for t in st.chunk_weights), st.offset)


def _double_mem(mem):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in mem.items()}


def _fields(st):
    return [("weights", st.weights), ("momentum", st.momentum),
            ("chunk_weights", st.chunk_weights)]


def _compare(o, st, o_ref, st_ref, tol, o32=None, st32=None, state_tol=STATE_TOL, amp=2):
    """Kernel (o, st) against float64 (o_ref, st_ref); (o32, st32): the fp32 reference on the
    same inputs, whose own error (times ``amp``) widens the bound where a draw is
    ill-conditioned. The state is held to ``state_tol`` (fp32's 1e-5 for the decode kernel's
    fp32 arithmetic)."""
    bound = max(tol, amp * rel_err(o32, o_ref)) if o32 is not None else tol
    assert rel_err(o, o_ref) <= bound, ("o", rel_err(o, o_ref), bound)
    for (name, got), (_, want), (_, f32) in zip(_fields(st), _fields(st_ref),
                                                _fields(st32 or st_ref)):
        for layer, (a, b, c) in enumerate(zip(got, want, f32)):
            assert a.dtype == torch.float32 and a.shape == b.shape
            bound = max(state_tol, amp * rel_err(c, b)) if st32 is not None else state_tol
            assert rel_err(a, b) <= bound, (name, layer, rel_err(a, b), bound)
    assert torch.equal(st.offset.cpu(), st_ref.offset.cpu())


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_decode_kernel_matches_reference(case):
    needs_kernels()
    args, weights, st, mem = _case(case)
    o, st_out = neural_memory(*args, weights, initial_state=st, output_final_state=True,
                              backend="cuda", **mem)
    assert o.dtype == args[0].dtype and o.shape == args[0].shape
    o_ref, st_ref = neural_memory(*(t.double() for t in args), tuple(w.double() for w in weights),
                                  initial_state=_double_state(st), output_final_state=True,
                                  backend="torch", **_double_mem(mem))
    o32, st32 = neural_memory(*(t.float() for t in args), weights, initial_state=st,
                              output_final_state=True, backend="torch", **mem)
    _compare(o, st_out, o_ref, st_ref, TOL[args[0].dtype], o32, st32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("read", ["token", "chunk"])
def test_decode_streaming_any_split_equals_one_call(dtype, read):
    """A 23-token sequence fed as one-token calls, and as pieces [3, 1, 5, 7, 2, 5], each with
    the previous call's state, equals one float64 reference call (outputs and final state)."""
    needs_kernels()
    N, T, H, D, C = 2, 23, 3, 64, 8
    q, k, v, lr, forget, momentum = make_inputs(N, T, H, D, dtype=torch.float32, device=DEV)
    weights = make_weights(H, D, 128, 2, dtype=torch.float32, device=DEV)
    mem = dict(chunk_size=C, activation="gelu", residual=True, read=read,
               ln_weight=1 + 0.2 * torch.randn(H, D, device=DEV),
               ln_bias=0.2 * torch.randn(H, D, device=DEV))
    qkv = [t.to(dtype) for t in (q, k, v)]
    o_ref, st_ref = neural_memory(*(t.double() for t in qkv), lr.double(), forget.double(),
                                  momentum.double(), tuple(w.double() for w in weights),
                                  output_final_state=True, backend="torch",
                                  **_double_mem(mem))
    o32, st32 = neural_memory(*(t.float() for t in qkv), lr, forget, momentum, weights,
                              output_final_state=True, backend="torch", **mem)
    for pieces in ([1] * T, [3, 1, 5, 7, 2, 5]):
        st, outs, t0 = None, [], 0
        for n in pieces:
            sl = slice(t0, t0 + n)
            o, st = neural_memory(*(t[:, sl] for t in qkv), lr[:, sl], forget[:, sl],
                                  momentum[:, sl], weights, initial_state=st,
                                  output_final_state=True, backend="cuda", **mem)
            outs.append(o)
            t0 += n
        _compare(torch.cat(outs, dim=1), st, o_ref, st_ref, TOL[dtype], o32, st32)


def test_decode_gradients_through_the_reference():
    """Every input and initial-state gradient of a decode call (the reference's VJP) against
    float64, including gradients flowing into the returned state. (The learned initial
    weights are unused when a state is given.)"""
    needs_kernels()
    args, weights, st, mem = _case((32, 64, 2, torch.float32, "silu", True, True, "bias",
                                    "token", 3, 4, "open"))
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (*args, *st.weights, *st.momentum, *st.chunk_weights)]

    def run(ls, backend, to=None):
        ls = [t.to(to) if to else t for t in ls]
        state = MemoryState(tuple(ls[6:8]), tuple(ls[8:10]), tuple(ls[10:12]), st.offset)
        m = _double_mem(mem) if to else mem
        ws = tuple(w.to(to) if to else w for w in weights)
        o, s = neural_memory(*ls[:6], ws, initial_state=state, output_final_state=True,
                             backend=backend, **m)
        return (o * cot.to(o.dtype)).sum() + (s.weights[1] * cw.to(o.dtype)).sum()
    cot = torch.randn(args[0].shape, device=DEV, dtype=torch.float64)
    cw = torch.randn(st.weights[1].shape, device=DEV, dtype=torch.float64)
    g = torch.autograd.grad(run(leaves, "cuda"), leaves)
    g_ref = torch.autograd.grad(run(leaves, "torch", torch.float64), leaves)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert rel_err(a, b) <= 1e-5, (i, rel_err(a, b))


def test_decode_kernel_writes_every_element():
    needs_kernels()
    for case in ([64, 256, 2, torch.bfloat16, "silu", True, True, "bias", "token", 5, 4, "open"],
                 [32, 32, 1, torch.float32, "gelu", False, False, None, "chunk", 1, 64, None]):
        args, weights, st, mem = _case(case)
        N, _, H, _ = args[0].shape
        nan = float("nan")
        out = [torch.full_like(args[0], nan)] + [
            torch.full((N, H, *w.shape[-2:]), nan, device=DEV) for _ in range(3) for w in weights]
        got = nm_ops._launch(*_op_args(args, weights, st, mem), out=out)
        for i, t in enumerate(got):
            assert torch.isfinite(t).all(), i


def _default_decode(T=1, dtype=torch.bfloat16):
    return _case((64, 256, 2, dtype, "silu", True, True, "bias", "token", T, 64, "open"), N=4,
                 H=4)


def test_decode_is_deterministic():
    needs_kernels()
    args, weights, st, mem = _default_decode(T=4)
    runs = [neural_memory(*args, weights, initial_state=st, output_final_state=True,
                          backend="cuda", **mem) for _ in range(2)]
    _assert_bitwise_equal(*runs)


def _assert_bitwise_equal(run_a, run_b):
    """Two (o, MemoryState) results are equal bit for bit: o and every state tensor."""
    assert torch.equal(run_a[0], run_b[0])
    for (_, a), (_, b) in zip(_fields(run_a[1]), _fields(run_b[1])):
        for x, y in zip(a, b):
            assert torch.equal(x, y)




def test_decode_op_cuda_graph_capture_and_replay():
    """The decode op (no host synchronisation) captured once and replayed on new inputs."""
    needs_kernels()
    args, weights, st, mem = _default_decode()
    static = [t.clone() for t in args]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        nm_ops.decode_op(*_op_args(static, weights, st, mem))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = nm_ops.decode_op(*_op_args(static, weights, st, mem))
    new_args = _default_decode()[0]
    for dst, src in zip(static, new_args):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    out_e = nm_ops.decode_op(*_op_args(new_args, weights, st, mem))
    for a, b in zip(out_g, out_e):
        assert torch.equal(a, b)


def test_decode_step_launches_the_decode_kernel_alone():
    """One decode op on MemoryState's int64 offset launches one kernel, the decode kernel: the
    offset reaches it as it is (a conversion launch cost ~1 us of a ~21 us step, H200)."""
    needs_kernels()
    args, weights, st, mem = _default_decode()
    assert st.offset.dtype == torch.int64
    op_args = _op_args(args, weights, st, mem)
    nm_ops.decode_op(*op_args)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        nm_ops.decode_op(*op_args)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "decode_kernel" in kernels[0], kernels


def test_decode_op_torch_compile_fullgraph():
    needs_kernels()
    args, weights, st, mem = _default_decode(T=2)
    fn = torch.compile(lambda *a: nm_ops.decode_op(*a), fullgraph=True)
    got = fn(*_op_args(args, weights, st, mem))
    want = nm_ops.decode_op(*_op_args(args, weights, st, mem))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_opcheck_decode_op_on_gpu():
    needs_kernels()
    args, weights, st, mem = _case((32, 64, 2, torch.float32, "gelu", True, True, None, "token",
                                    2, 4, "open"), N=2)
    leaves = [t.requires_grad_() for t in args]
    torch.library.opcheck(nm_ops.decode_op, _op_args(leaves, weights, st, mem))


def test_decode_support_rule_matches_the_extension():
    needs_kernels()
    for D, hidden, depth in itertools.product((8, 16, 24, 32, 64, 128, 256),
                                              (2, 4, 16, 48, 512, 516, 1024), (1, 2, 3)):
        assert nm_ops.decode_shape_supported(D, hidden, depth) == \
            _lib._C.neural_memory_decode_supported(dim=D, hidden=hidden, depth=depth)


def test_long_calls_and_cu_seqlens_go_to_the_chunked_kernel():
    needs_kernels()
    args, weights, st, mem = _default_decode(T=nm_ops.DECODE_MAX_T + 1)
    assert "no fused CUDA kernel" in nm_ops.decode_reason(args[0], weights, None, st)
    assert nm_ops.chunked_reason(args[0], weights, mem["chunk_size"], None, st) is None
    packed = [t[:1] for t in _default_decode(T=4)[0]]
    cu = torch.tensor([0, 1, 4], device=DEV, dtype=torch.int32)
    assert "cu_seqlens" in nm_ops.decode_reason(packed[0], weights, cu, None)
    assert nm_ops.chunked_reason(packed[0], weights, mem["chunk_size"], cu, None) is None


@pytest.mark.parametrize("case", [
    (64, 256, 2, torch.bfloat16, "silu", True, True, "bias", "token", 3, 4, "open"),
    (128, 128, 2, torch.float32, "gelu", False, True, None, "chunk", 2, 2, "open"),
    (32, 32, 1, torch.float32, "silu", True, False, None, "token", 5, 3, "open"),
    (16, 64, 2, torch.float16, "gelu", True, True, "bias", "token", 1, 8, None)],
    ids=["D64-h256-bf16", "D128-h128-f32-chunk", "D32-L1-f32", "D16-h64-f16"])
def test_decode_every_cluster_split_matches_the_reference(case):
    """The CTAs of one (sequence, head) split the hidden units (a thread-block cluster on
    sm_90): every split the launcher may pick (1, 2, 4, 8, where the slice stays a multiple of
    4 wide) gives the reference's outputs and state."""
    needs_kernels()
    args, weights, st, mem = _case(case)
    o_ref, st_ref = neural_memory(*(t.double() for t in args), tuple(w.double() for w in weights),
                                  initial_state=_double_state(st), output_final_state=True,
                                  backend="torch", **_double_mem(mem))
    width = weights[0].shape[-1] if len(weights) == 2 else args[0].shape[-1]
    major = torch.cuda.get_device_capability()[0]
    splits = [s for s in (1, 2, 4, 8) if width % (4 * s) == 0 and (s == 1 or major >= 9)]
    assert len(splits) >= 2
    N = args[0].shape[0]
    for split in splits:
        outs = nm_ops._launch(*_op_args(args, weights, st, mem), split=split)
        L = len(weights)
        off = (torch.zeros(N, dtype=torch.long, device=DEV) if st is None else st.offset)
        state = MemoryState(tuple(outs[1:1 + L]), tuple(outs[1 + L:1 + 2 * L]),
                            tuple(outs[1 + 2 * L:]), (off + args[0].shape[1]) % mem["chunk_size"])
        _compare(outs[0], state, o_ref, st_ref, TOL[args[0].dtype])


@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_decode_launcher_takes_the_split_it_documents(N):
    """The launcher's split (decode.cu, auto_split) at H = 16, D = 64, hidden 256: on sm_90+ 4
    CTAs per (sequence, head) while the grid takes at most half the SMs, 2 while it fits the
    SMs, else 1 (one CTA below sm_90). The default call gives the bits of that forced split
    (the splits sum the key's and the read's vectors in different orders)."""
    needs_kernels()
    case = (64, 256, 2, torch.bfloat16, "silu", True, True, "bias", "token", 2, 64, "open")
    args, weights, st, mem = _case(case, N=N, H=16)
    props = torch.cuda.get_device_properties(0)
    pairs, sms = N * 16, props.multi_processor_count
    want = 1
    if props.major >= 9:
        want = 4 if 4 * pairs <= sms // 2 else (2 if 2 * pairs <= sms else 1)
    got = nm_ops._launch(*_op_args(args, weights, st, mem))
    forced = nm_ops._launch(*_op_args(args, weights, st, mem), split=want)
    for a, b in zip(got, forced):
        assert torch.equal(a, b)
    if want > 1:  # and not the bits of one CTA (else the test could not tell)
        one = nm_ops._launch(*_op_args(args, weights, st, mem), split=1)
        assert any(not torch.equal(a, b) for a, b in zip(got, one))
