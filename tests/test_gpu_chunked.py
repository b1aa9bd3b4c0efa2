"""GPU tests of the chunked neural_memory kernel (csrc/neural_memory/chunked.cu; marked ``gpu``,
skipped without CUDA): outputs and the whole final state against the float64 reference on the
same rounded inputs within SPEC §7 (the input dtype's bound for the state too: the kernel's
products take bf16/fp16 operands), over a grid of 320 configurations (every (D, expansion,
depth, chunk) whose shared-memory plan fits an H100, both dtypes, four call kinds each: fresh,
an initial state with open chunks, cu_seqlens with lengths that are not multiples of C and an
empty sequence, read "chunk"; activation, residual, LayerNorm +- bias cycled; alpha = 1 resets
and eta = 0 in every draw), gradients on a quarter of the grid (the reference's VJP), any-split
streaming equality, a 1,048,576-token sequence, full writes, determinism, CUDA graphs,
torch.compile and opcheck on the kernel path, every cluster split (sm_90+), and the fallbacks.
fp32 inputs at depth 1 (the depth-1 fp32 kernel) have a grid of their own, FP32_GRID: 36
configurations against float64 at SPEC §7's 1e-5, gradients on half."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_inputs, make_weights, needs_kernels, rel_err
from test_gpu_decode import (TOL, _assert_bitwise_equal, _compare, _double_mem, _double_state,
                             _random_state)
from test_gpu_decode import _op_args as _decode_op_args

# The kernel's operands carry about 17 significant bits (split bf16) against fp32's 24. Where a
# draw is so ill-conditioned that the fp32 reference itself loses digits (LayerNorm of a nearly
# erased memory: its error reaches 1e-3 in this grid), the kernel is held to AMP times the fp32
# reference's error instead of SPEC §7's bound; everywhere else to SPEC §7.
AMP = 256
from titans_cuda import MemoryState, _lib, neural_memory
from titans_cuda.ops.neural_memory import ops as nm_ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = (torch.bfloat16, torch.float16)
SHAPES = [(D, e, 2) for D in (32, 64, 128) for e in (1, 2, 4)] + [(D, 1, 1) for D in (32, 64, 128)]
CHUNKS = (16, 32, 64, 128)
H100_SMEM = 227 * 1024
HEADS = [(False, False, None), (True, True, "bias"), (True, False, None), (False, True, None)]
KINDS = ("fresh", "open", "varlen", "chunk-read")


def _smem(D, hidden, depth, C, dtype=torch.bfloat16):
    """The kernel's shared-memory plan (make_layout in chunked_kernel.cuh), in bytes: split
    (two-plane) bf16 buffers for q, k, dz2, the block's hk and dz1 and the staged state blocks,
    then G and the gate vectors. It does not depend on hidden. Where the depth-1 fp32 kernel
    runs (fp32 inputs; D = 128 with chunk 64: make_layout_f1 in chunked_fwd1_kernel.cuh), its
    plan: q, k (C x D), fk / dz and z (C x D / S), W, S and Wg (D x D / S), A and G (C x C),
    nine row vectors and at S > 1 two exchange buffers of 2 C, fp32 with odd row strides; S = 4
    at D = 128, else 1."""
    if nm_ops._takes_fwd1(D, depth, C, dtype):
        S = 4 if D > 64 else 1
        ds = D // S
        return 4 * (2 * C * (D + 1) + 2 * C * (ds + 1) + 3 * D * (ds + 1) + 2 * C * (C + 1)
                    + 9 * C + (4 * C if S > 1 else 0))
    hb = nm_ops.CHUNKED_HIDDEN_BLOCK
    bw = hb if depth == 2 else D
    sizes = [4 * C * (D + 8)] * 3 + [4 * C * (hb + 8) if depth == 2 else 0] * 2 + \
        [4 * D * (bw + 8)] * 2 + [4 * hb * (D + 8) if depth == 2 else 0] * 2 + \
        [C * (C + 4) * 4, 9 * C * 4]
    return sum(-(-s // 16) * 16 for s in sizes)


def _shapes(fit):
    """The shapes whose kernel's plan fits an H100 (``fit``) or does not: chunk 128 at depth 2
    and D = 64 / 128 runs as two sub-chunks of 64 (nm_ops.fwd_chunking), with chunk 64's plan."""
    return [(D, e * D, depth, C) for (D, e, depth), C in itertools.product(SHAPES, CHUNKS)
            if (_smem(D, e * D, depth, nm_ops.fwd_chunking(D, depth, C)[0]) <= H100_SMEM) == fit]


FITTING, TOO_BIG = _shapes(True), _shapes(False)


def _grid():
    cases = []
    for i, ((D, hid, depth, C), dtype) in enumerate(itertools.product(FITTING, DTYPES)):
        for j, kind in enumerate(KINDS):
            residual, ln, bias = HEADS[(i + j) % len(HEADS)]
            act = ("silu", "gelu")[(i + j) % 2]
            cases.append((D, hid, depth, C, dtype, act, residual, ln, bias, kind))
    return cases


GRID = _grid()
assert len(GRID) >= 300, len(GRID)


def _id(c):
    D, hid, depth, C, dtype, act, res, ln, bias, kind = c
    return (f"D{D}-h{hid}-L{depth}-C{C}-{str(dtype).split('.')[-1]}-{act}-"
            f"{'res' if res else 'nores'}-{'ln' + ('b' if bias else '') if ln else 'noln'}-{kind}")


def _case(case, H=2):
    """(args [q, k, v in dtype, fp32 gates], weights, state, mem keywords, cu_seqlens)."""
    D, hid, depth, C, dtype, act, residual, ln, bias, kind = case
    cu = None
    if kind == "varlen":  # lengths not multiples of C, one empty, one shorter than a chunk
        lengths = [C + 3, 0, 2 * C - 1, 5]
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), device=DEV)
        B, T, N = 1, sum(lengths), len(lengths)
    else:
        B, T = 3, (2 * C + 5 if kind != "open" else C + 3)
        N = B
    q, k, v, lr, forget, momentum = make_inputs(B, T, H, D, dtype=torch.float32, device=DEV)
    forget[0, T - 2, 1] = 1.0  # an exact reset near the end too
    weights = make_weights(H, D, hid, depth, dtype=torch.float32, device=DEV)
    st = _random_state(N, H, weights, C) if kind in ("open", "varlen") else None
    mem = dict(chunk_size=C, activation=act, residual=residual,
               read="chunk" if kind == "chunk-read" else "token",
               ln_weight=(1 + 0.2 * torch.randn(H, D, device=DEV)) if ln else None,
               ln_bias=(0.2 * torch.randn(H, D, device=DEV)) if ln and bias else None)
    return [t.to(dtype) for t in (q, k, v)] + [lr, forget, momentum], weights, st, mem, cu


def _references(args, weights, st, mem, cu):
    ref = neural_memory(*(t.double() for t in args), tuple(w.double() for w in weights),
                        initial_state=_double_state(st), output_final_state=True,
                        backend="torch", cu_seqlens=cu, **_double_mem(mem))
    r32 = neural_memory(*(t.float() for t in args), weights, initial_state=st,
                        output_final_state=True, backend="torch", cu_seqlens=cu, **mem)
    return ref, r32


# fp32 inputs run at depth 1 on the depth-1 fp32 kernel (chunked_fwd1_kernel.cuh): every D with
# every chunk (128 as sub-chunks: 2 x 64, or 4 x 32 at D = 128), each of the four kinds, the
# heads and activations cycled; gradients on every other case (the depth-1 fused backward in
# fp32, at D = 128, C = 64 and at chunk 128 over sub-chunks).
FP32_GRID = [(D, D, 1, C, torch.float32, ("silu", "gelu")[i % 2], *HEADS[i % 4], kind)
             for i, (D, C, kind) in enumerate(itertools.product((32, 64, 128), (16, 32, 64, 128),
                                                                KINDS))]


@pytest.mark.parametrize("case", FP32_GRID, ids=[_id(c) for c in FP32_GRID])
def test_chunked_fp32_depth1_matches_reference(case):
    """fp32 inputs: outputs and the final state within SPEC §7's 1e-5 of float64 (or AMP times
    the fp32 reference's own error on an ill-conditioned draw), and the gradients."""
    needs_kernels()
    args, weights, st, mem, cu = _case(case)
    if case[0] > 64 and torch.cuda.get_device_capability()[0] < 9:
        assert "cluster" in nm_ops.chunked_reason(args[0], weights, case[3], cu, st)
        pytest.skip("D = 128 at depth 1 runs as a cluster (sm_90+)")
    assert nm_ops.chunked_reason(args[0], weights, mem["chunk_size"], cu, st) is None
    o, st_out = neural_memory(*args, weights, initial_state=st, output_final_state=True,
                              backend="cuda", cu_seqlens=cu, **mem)
    assert o.dtype == torch.float32 and o.shape == args[0].shape
    (o_ref, st_ref), (o32, st32) = _references(args, weights, st, mem, cu)
    _compare(o, st_out, o_ref, st_ref, TOL[torch.float32], o32, st32, TOL[torch.float32], AMP)
    if FP32_GRID.index(case) % 2 == 0:
        _check_gradients(args, weights, st, mem, cu)


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_chunked_kernel_matches_reference(case):
    needs_kernels()
    args, weights, st, mem, cu = _case(case)
    assert nm_ops.chunked_reason(args[0], weights, mem["chunk_size"], cu, st) is None
    o, st_out = neural_memory(*args, weights, initial_state=st, output_final_state=True,
                              backend="cuda", cu_seqlens=cu, **mem)
    assert o.dtype == args[0].dtype and o.shape == args[0].shape
    (o_ref, st_ref), (o32, st32) = _references(args, weights, st, mem, cu)
    _compare(o, st_out, o_ref, st_ref, TOL[args[0].dtype], o32, st32, TOL[args[0].dtype], AMP)
    if GRID.index(case) % 4 == 0:
        _check_gradients(args, weights, st, mem, cu)


def _check_gradients(args, weights, st, mem, cu):
    """Every input, weight and initial-state gradient of a kernel call, with a cotangent on o
    and on the returned state. Off the fused backward's shapes they are the reference's VJP:
    equal to the fp32 reference's gradients, and within SPEC §7 of float64 (or twice the fp32
    reference's own error on an ill-conditioned draw); on them (test_gpu_chunked_bwd.py), within
    SPEC §7 of float64 or AMP times the fp32 reference's error."""
    n_w = len(weights)
    fused = nm_ops.chunked_bwd_reason(args[0], weights, mem["chunk_size"], cu, st,
                                      mem["read"]) is None
    state_leaves = [] if st is None else [*st.weights, *st.momentum, *st.chunk_weights]
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (*args, *weights, *state_leaves)]
    cot = torch.randn(args[0].shape, device=DEV, dtype=torch.float64)

    def run(ls, backend, to=None):
        ls = [t.to(to) if to else t for t in ls]
        ws = tuple(ls[6:6 + n_w])
        rest = ls[6 + n_w:]
        state = None if st is None else MemoryState(
            tuple(rest[:n_w]), tuple(rest[n_w:2 * n_w]), tuple(rest[2 * n_w:]), st.offset)
        o, s = neural_memory(*ls[:6], ws, initial_state=state, output_final_state=True,
                             backend=backend, cu_seqlens=cu, **(_double_mem(mem) if to else mem))
        cw = torch.linspace(-1, 1, s.weights[-1].numel(), device=DEV).view_as(s.weights[-1])
        return (o * cot.to(o.dtype)).sum() + (s.weights[-1] * cw.to(o.dtype)).sum()
    g = torch.autograd.grad(run(leaves, "cuda"), leaves, allow_unused=True)
    g32 = torch.autograd.grad(run(leaves, "torch"), leaves, allow_unused=True)
    g64 = torch.autograd.grad(run(leaves, "torch", torch.float64), leaves, allow_unused=True)
    for i, (a, b, c) in enumerate(zip(g, g64, g32)):
        if b is None:  # the learned initial weights are unused when a state is given
            assert a is None or not a.any(), i
            continue
        if not fused:
            assert rel_err(a, c) <= 1e-6, (i, rel_err(a, c))
        bound = max(TOL[args[0].dtype], (AMP if fused else 2) * rel_err(c, b))
        assert rel_err(a, b) <= bound, (i, rel_err(a, b), bound)


@pytest.mark.parametrize("shape", TOO_BIG, ids=[f"D{c[0]}-h{c[1]}-L{c[2]}-C{c[3]}"
                                                for c in TOO_BIG])
def test_chunked_configurations_past_shared_memory_fall_back(shape):
    """Shapes whose plan exceeds the GPU's shared memory run the reference (auto) or raise
    naming the limit (cuda)."""
    needs_kernels()
    D, hid, depth, C = shape
    args, weights, st, mem, cu = _case((D, hid, depth, C, torch.bfloat16, "silu", False, False,
                                        None, "fresh"))
    limit = _lib.smem_per_block_optin(torch.cuda.current_device())
    if _smem(D, hid, depth, C) <= limit:
        pytest.skip(f"this GPU allows {limit} bytes per block")
    with pytest.raises(RuntimeError, match="shared memory"):
        neural_memory(*args, weights, backend="cuda", **mem)


def test_chunked_smem_plan_matches_the_extension():
    needs_kernels()
    for (D, e, depth), C in itertools.product(SHAPES, CHUNKS):
        assert _smem(D, e * D, depth, C) == _lib._C.neural_memory_chunked_smem_bytes(
            dim=D, hidden=e * D, depth=depth, chunk=C, dtype=0)


def test_chunked_support_rule_matches_the_extension():
    needs_kernels()
    for D, hidden, depth, C in itertools.product((16, 32, 48, 64, 128, 256),
                                                 (16, 32, 48, 64, 96, 128, 512, 576),
                                                 (1, 2, 3), (8, 16, 32, 64, 100, 128, 256)):
        for dtype in (0, 1, 2):
            want = nm_ops.chunked_shape_supported(D, hidden, depth, C,
                                                  nm_ops.KERNEL_DTYPES[dtype])
            assert want == _lib._C.neural_memory_chunked_supported(
                dim=D, hidden=hidden, depth=depth, chunk=C, dtype=dtype), (D, hidden, depth, C,
                                                                           dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("read", ["token", "chunk"])
def test_chunked_streaming_any_split_equals_one_call(dtype, read):
    """A 150-token sequence fed in pieces [37, 1, 64, 20, 28] (the short ones through the decode
    kernel, the rest through the chunked one) and in pieces [40, 50, 60], each with the
    previous call's state, equals one float64 reference call."""
    needs_kernels()
    N, T, H, D, C = 2, 150, 3, 64, 32
    q, k, v, lr, forget, momentum = make_inputs(N, T, H, D, dtype=torch.float32, device=DEV)
    weights = make_weights(H, D, 128, 2, dtype=torch.float32, device=DEV)
    mem = dict(chunk_size=C, activation="gelu", residual=True, read=read,
               ln_weight=1 + 0.2 * torch.randn(H, D, device=DEV),
               ln_bias=0.2 * torch.randn(H, D, device=DEV))
    qkv = [t.to(dtype) for t in (q, k, v)]
    args = [*qkv, lr, forget, momentum]
    (o_ref, st_ref), (o32, st32) = _references(args, weights, None, mem, None)
    for pieces in ([37, 1, 64, 20, 28], [40, 50, 60]):
        st, outs, t0 = None, [], 0
        for n in pieces:
            sl = slice(t0, t0 + n)
            o, st = neural_memory(*(t[:, sl] for t in args), weights, initial_state=st,
                                  output_final_state=True, backend="cuda", **mem)
            outs.append(o)
            t0 += n
        _compare(torch.cat(outs, dim=1), st, o_ref, st_ref, TOL[dtype], o32, st32, TOL[dtype],
                 AMP)


@pytest.mark.slow
def test_chunked_one_million_tokens():
    """One sequence of 2^20 tokens (B = 1, H = 2, D = 64, hidden 256, C = 64, bf16): finite and
    within bf16's bound of the float64 reference, outputs and final state. A contractive
    setting (no LayerNorm, lr <= 0.1), since long LayerNorm runs are chaotic for any rounding."""
    needs_kernels()
    T, H, D = 1 << 20, 2, 64
    q, k, v, lr, forget, momentum = make_inputs(1, T, H, D, dtype=torch.float32, device=DEV,
                                                lr_max=0.1)
    forget[0, ::100_003, 0] = 1.0  # resets along the way
    weights = make_weights(H, D, 4 * D, 2, dtype=torch.float32, device=DEV)
    mem = dict(chunk_size=64, activation="silu", residual=True)
    args = [t.to(torch.bfloat16) for t in (q, k, v)] + [lr, forget, momentum]
    o, st = neural_memory(*args, weights, output_final_state=True, backend="cuda", **mem)
    assert torch.isfinite(o).all()
    for t in st.weights + st.momentum:
        assert torch.isfinite(t).all()
    o_ref, st_ref = neural_memory(*(t.double() for t in args), tuple(w.double() for w in weights),
                                  output_final_state=True, backend="torch", **mem)
    assert rel_err(o, o_ref) <= TOL[torch.bfloat16], rel_err(o, o_ref)
    for a, b in zip(st.weights + st.momentum, st_ref.weights + st_ref.momentum):
        assert rel_err(a, b) <= 1e-3, rel_err(a, b)


def _default_case(T=300, dtype=torch.bfloat16, kind="open"):
    return _case((64, 256, 2, 64, dtype, "silu", True, True, "bias", kind), H=4)


def _op_args(args, weights, st, mem, cu):
    """chunked_op's positional arguments: decode_op's, cu_seqlens and checkpoint_every (0:
    no checkpoints kept)."""
    return (*_decode_op_args(args, weights, st, mem), cu, 0)


def test_chunked_kernel_writes_every_element():
    needs_kernels()
    for kind in ("open", "varlen", "chunk-read"):
        args, weights, st, mem, cu = _default_case(kind=kind)
        B, _, H, _ = args[0].shape
        N = B if cu is None else cu.numel() - 1
        nan = float("nan")
        out = [torch.full_like(args[0], nan)] + [
            torch.full((N, H, *w.shape[-2:]), nan, device=DEV) for _ in range(3) for w in weights]
        got = nm_ops._launch(*_op_args(args, weights, st, mem, None)[:-2], cu_seqlens=cu,
                             out=out, kernel="chunked")
        for i, t in enumerate(got):
            assert torch.isfinite(t).all(), (kind, i)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_every_cluster_split_matches_the_reference(kind):
    """Depth 2 spreads a (sequence, head) over a cluster of 1 to 8 CTAs (sm_90+), or over 2 to
    8 ordinary CTAs exchanging through global memory (split < 0), each owning every split-th
    hidden block (3 does not divide the 8 blocks) and adding fk and z2 in rank order: every
    split the launcher may pick writes every output (NaN-poisoned buffers), matches the float64
    reference, and is bitwise reproducible; a global split equals the cluster of its size bit
    for bit. The launcher's own choice (split 0) is one of them."""
    needs_kernels()
    args, weights, st, mem, cu = _default_case(kind=kind)
    B, _, H, _ = args[0].shape
    N = B if cu is None else cu.numel() - 1
    L = len(weights)
    clusters = [2, 3, 4, 8] if torch.cuda.get_device_capability()[0] >= 9 else []
    splits = [1] + clusters + [-2, -3, -4, -8]  # < 0: ordinary CTAs, global exchange
    (o_ref, st_ref), (o32, st32) = _references(args, weights, st, mem, cu)
    runs = {}
    for split in splits + [0]:
        for rep in range(2 if split else 1):
            out = [torch.full_like(args[0], float("nan"))] + [
                torch.full((N, H, *w.shape[-2:]), float("nan"), device=DEV)
                for _ in range(3) for w in weights]
            got = nm_ops._launch(*_op_args(args, weights, st, mem, None)[:-2], cu_seqlens=cu,
                                 out=out, split=split, kernel="chunked")
            for i, t in enumerate(got):
                assert torch.isfinite(t).all(), (split, i)
            if rep == 1:
                for a, b in zip(runs[split], got):
                    assert torch.equal(a, b), split
                continue
            runs[split] = got
            off = torch.zeros(N, dtype=torch.long, device=DEV) if st is None else st.offset
            ends = (off + (cu.diff() if cu is not None else args[0].shape[1])) % mem["chunk_size"]
            state = MemoryState(tuple(got[1:1 + L]), tuple(got[1 + L:1 + 2 * L]),
                                tuple(got[1 + 2 * L:]), ends)
            _compare(got[0], state, o_ref, st_ref, TOL[args[0].dtype], o32, st32,
                     TOL[args[0].dtype], AMP)
    assert any(all(torch.equal(a, b) for a, b in zip(runs[0], runs[s])) for s in splits)
    for s in clusters:  # the same sums in the same order: the same bits
        assert all(torch.equal(a, b) for a, b in zip(runs[s], runs[-s])), s
    with pytest.raises(RuntimeError):  # more CTAs than the 8 hidden blocks
        nm_ops._launch(*_op_args(args, weights, st, mem, None)[:-2], cu_seqlens=cu, split=9,
                       kernel="chunked")


def test_chunked_launcher_takes_one_block_per_cta_where_ordinary_ctas_fit(monkeypatch):
    """At 15 (sequence, head) pairs and 8 hidden blocks, 8 ordinary CTAs per pair (120 CTAs)
    are resident at once on a GPU of >= 120 SMs, one hidden block each: the launcher's choice
    (split 0) then gives the bits of the global split of 8 (those of a cluster of 8 too, where
    15 such clusters fit; on an H100 they do not, and clusters of 4 are the best). With
    FORWARD_GLOBAL_SPLIT off it is one of the cluster splits (one CTA below sm_90)."""
    needs_kernels()
    args, weights, st, mem, cu = _case((64, 256, 2, 64, torch.bfloat16, "silu", True, True,
                                        "bias", "fresh"), H=5)
    props = torch.cuda.get_device_properties(DEV)
    if props.multi_processor_count < 120:
        pytest.skip("fewer than 120 SMs: 8 CTAs for each of 15 pairs would not all be resident")
    run = lambda split: nm_ops._launch(  # noqa: E731
        *_op_args(args, weights, st, mem, None)[:-2], split=split, kernel="chunked")
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    chosen, global8 = run(0), run(-8)
    assert same(chosen, global8)
    monkeypatch.setattr(nm_ops, "FORWARD_GLOBAL_SPLIT", False)
    clusters = run(0)
    cands = [1] + ([2, 3, 4, 8] if torch.cuda.get_device_capability()[0] >= 9 else [])
    assert any(same(clusters, run(s)) for s in cands)


def _chunk_starts(args, weights, st, mem, cu, dtype):
    """The reference's (W, S) at the start of every chunk of the padded timeline, in dtype."""
    from titans_cuda.ops.neural_memory import reference as nm_ref
    state = _double_state(st) if dtype == torch.float64 else st
    m = _double_mem(mem) if dtype == torch.float64 else mem
    P = nm_ref._prepare(*(t.to(dtype) for t in args), tuple(w.to(dtype) for w in weights),
                        chunk_size=m["chunk_size"], activation=m["activation"],
                        residual=m["residual"], ln_weight=m["ln_weight"], ln_bias=m["ln_bias"],
                        ln_eps=1e-6, initial_state=state, cu_seqlens=cu)
    starts, w, s = [], P.w, P.s
    for j in range(P.n_chunks):
        starts.append((w, s))
        _, w, s = nm_ref.chunk_step(P.qt[:, :, j], P.kt[:, :, j], P.vt[:, :, j],
                                    P.lr_t[:, :, j], P.decay_t[:, :, j], P.eta_t[:, :, j],
                                    P.act_t[:, :, j], w, s, P.wg0 if j == 0 else w, mlp=P.mlp,
                                    read=m["read"])
    return starts


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("kind", ["fresh", "open", "varlen"])
def test_chunked_checkpoints_are_the_chunk_start_states(kind, K):
    """checkpoint_every=K: the kernel also writes (W, S) at the start of chunks 0, K, 2K, ... of
    each sequence (the fused backward's checkpoints), within the state's bound of the float64
    reference's chunk-start states; o and the final state are those of a call without."""
    needs_kernels()
    args, weights, st, mem, cu = _default_case(kind=kind)
    L, C = len(weights), mem["chunk_size"]
    base = _op_args(args, weights, st, mem, None)[:-2]
    plain = nm_ops._launch(*base, cu_seqlens=cu, kernel="chunked")
    got = nm_ops._launch(*base, cu_seqlens=cu, kernel="chunked", checkpoint_every=K)
    for a, b in zip(plain, got[:len(plain)]):
        assert torch.equal(a, b)
    ck_w, ck_s, z2, fk = (got[1 + 3 * L:1 + 4 * L], got[1 + 4 * L:1 + 5 * L], got[1 + 5 * L],
                          got[2 + 5 * L])
    assert len(got) == 3 + 5 * L
    # the read's z2 gives o through the head: o = q + LN(z2) gamma + beta
    q = args[0]
    ln_eps = base[16]
    o_hat = q.float() + torch.nn.functional.layer_norm(z2, (q.shape[-1],), eps=ln_eps) * \
        mem["ln_weight"].view(1, 1, *mem["ln_weight"].shape) + \
        mem["ln_bias"].view(1, 1, *mem["ln_bias"].shape)
    assert mem["residual"] and z2.shape == q.shape
    assert rel_err(o_hat.to(q.dtype).float(), got[0].float()) < 1e-2
    # the keys' fk: the memory at the chunk's gradient weights, for the first chunk of a fresh
    # call the initial weights: phi(k W1) W2
    if kind == "fresh":
        kk = args[1][:, :C].float()
        h1 = torch.einsum("bthd,hde->bthe", kk, weights[0].float())
        h1 = torch.nn.functional.silu(h1) if mem["activation"] == "silu" else \
            torch.nn.functional.gelu(h1)
        want = torch.einsum("bthe,hed->bthd", h1, weights[1].float())
        assert rel_err(fk[:, :C], want) < 1e-4, rel_err(fk[:, :C], want)
    s64 = _chunk_starts(args, weights, st, mem, cu, torch.float64)
    s32 = _chunk_starts(args, weights, st, mem, cu, torch.float32)
    lengths = (cu.diff() if cu is not None else
               torch.full((args[0].shape[0],), args[0].shape[1], device=DEV)).cpu()
    offsets = (torch.zeros_like(lengths) if st is None else st.offset.cpu())
    checked = 0
    for n in range(lengths.numel()):
        n_chunks = -(-int(offsets[n] + lengths[n]) // C) if lengths[n] > 0 else 0
        for c in range(-(-n_chunks // K)):
            for which, ck in ((0, ck_w), (1, ck_s)):
                for layer in range(L):
                    want = s64[c * K][which][layer][n]
                    f32 = s32[c * K][which][layer][n]
                    bound = max(TOL[args[0].dtype], AMP * rel_err(f32, want))
                    err = rel_err(ck[layer][c, n], want)
                    assert err <= bound, (n, c, which, layer, err, bound)
                    checked += 1
    assert checked >= 4 * L


ROWS_CASES = [  # (case, split)
    ((64, 256, 2, 64, torch.bfloat16, "silu", True, True, "bias", "open"), 0),
    ((64, 256, 2, 64, torch.bfloat16, "gelu", False, True, None, "varlen"), 3),
    ((64, 256, 2, 64, torch.bfloat16, "silu", True, False, None, "chunk-read"), -4),
    ((64, 128, 2, 64, torch.float16, "silu", True, True, "bias", "open"), 0),
    ((32, 128, 2, 128, torch.bfloat16, "gelu", True, True, "bias", "varlen"), 0),
    ((128, 256, 2, 32, torch.bfloat16, "silu", False, True, None, "open"), 0),
    ((64, 64, 1, 64, torch.bfloat16, "gelu", True, True, "bias", "open"), 0),
    ((32, 32, 1, 16, torch.bfloat16, "silu", False, False, None, "varlen"), 0),
]


@pytest.mark.parametrize("case, split", ROWS_CASES,
                         ids=[f"{_id(c)}-split{s}" for c, s in ROWS_CASES])
def test_chunked_rows_of_any_layout_give_the_same_bits(case, split, monkeypatch):
    """The bf16 kernel copies the q, k rows into shared memory by 16-byte cp.async (zeros for
    the slots outside a sequence: offsets, varlen), the fp16 kernel through the registers.
    q, k whose rows are 16-byte aligned views (heads D + 8 elements apart) are read in place,
    other layouts (D + 1 apart) are copied by ops._qkv: both give the contiguous inputs' bits
    (o, the final state, the checkpoints' written slots, z2 and fk). A misaligned bf16 row that
    reaches the launcher is refused, not read."""
    needs_kernels()
    args, weights, st, mem, cu = _case(case, H=3)
    base = _op_args(args, weights, st, mem, None)[:-2]
    L, C, K = len(weights), mem["chunk_size"], 2

    def views(extra):
        out = list(base)
        for i in (0, 1):
            t = args[i]
            wide = torch.randn(*t.shape[:-1], t.shape[-1] + extra, device=DEV).to(t.dtype)
            wide[..., :t.shape[-1]] = t
            out[i] = wide[..., :t.shape[-1]]
            assert torch.equal(out[i], t)
        return out
    aligned, odd = views(8), views(1)
    assert nm_ops._qkv(aligned[0]).data_ptr() == aligned[0].data_ptr()
    assert nm_ops._qkv(odd[0]).data_ptr() != odd[0].data_ptr()
    run = lambda a: nm_ops._launch(*a, cu_seqlens=cu, split=split, kernel="chunked",  # noqa
                                   checkpoint_every=K)
    want = run(base)
    N = args[0].shape[0] if cu is None else cu.numel() - 1
    lengths = (cu.diff() if cu is not None else
               torch.full((N,), args[0].shape[1], device=DEV)).cpu()
    offsets = torch.zeros_like(lengths) if st is None else st.offset.cpu()
    for got in (run(aligned), run(odd)):
        assert len(got) == len(want)
        for i in list(range(1 + 3 * L)) + list(range(1 + 5 * L, len(want))):
            assert torch.equal(got[i], want[i]), i
        for n in range(N):  # the checkpoints' written slots
            n_chunks = -(-int(offsets[n] + lengths[n]) // C) if lengths[n] > 0 else 0
            for i in range(1 + 3 * L, 1 + 5 * L):
                assert torch.equal(got[i][:-(-n_chunks // K), n], want[i][:-(-n_chunks // K), n])
    if args[0].dtype == torch.bfloat16:
        monkeypatch.setattr(nm_ops, "_qkv", lambda t: t)
        with pytest.raises(RuntimeError):
            run(odd)


def test_chunked_is_deterministic():
    needs_kernels()
    args, weights, st, mem, cu = _default_case(kind="varlen")
    runs = [neural_memory(*args, weights, initial_state=st, output_final_state=True,
                          backend="cuda", cu_seqlens=cu, **mem) for _ in range(2)]
    _assert_bitwise_equal(*runs)


def test_chunked_op_cuda_graph_capture_and_replay():
    """The chunked op (no host synchronisation) captured once and replayed on new inputs."""
    needs_kernels()
    args, weights, st, mem, cu = _default_case(kind="varlen")
    static = [t.clone() for t in args]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        nm_ops.chunked_op(*_op_args(static, weights, st, mem, cu))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = nm_ops.chunked_op(*_op_args(static, weights, st, mem, cu))
    new_args = _default_case(kind="varlen")[0]
    for dst, src in zip(static, new_args):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    out_e = nm_ops.chunked_op(*_op_args(new_args, weights, st, mem, cu))
    for a, b in zip(out_g, out_e):
        assert torch.equal(a, b)


def test_chunked_op_torch_compile_fullgraph():
    needs_kernels()
    args, weights, st, mem, cu = _default_case()
    fn = torch.compile(lambda *a: nm_ops.chunked_op(*a), fullgraph=True)
    got = fn(*_op_args(args, weights, st, mem, cu))
    want = nm_ops.chunked_op(*_op_args(args, weights, st, mem, cu))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_opcheck_chunked_op_on_gpu():
    needs_kernels()
    args, weights, st, mem, cu = _case((32, 64, 2, 16, torch.bfloat16, "gelu", True, True, None,
                                        "varlen"))
    leaves = [t.requires_grad_() for t in args]
    torch.library.opcheck(nm_ops.chunked_op, _op_args(leaves, weights, st, mem, cu))


def test_chunked_fallback_reasons():
    needs_kernels()
    args, weights, st, mem, cu = _default_case()
    with pytest.raises(RuntimeError, match="bf16/fp16"):
        neural_memory(*(t.float() if i < 3 else t for i, t in enumerate(args)), weights,
                      initial_state=st, backend="cuda", **mem)
    with pytest.raises(RuntimeError, match="chunk_size=8"):
        neural_memory(*args, weights, backend="cuda", **{**mem, "chunk_size": 8})
