"""The depth-1 fused backward (csrc/neural_memory/chunked_bwd1_kernel.cuh) against the float64
reference: every (D, chunk) instance (D = 128 as clusters of 4), both dtypes, both reads, the
four output heads, fresh calls (T % C > 0), initial states with open chunks (offsets 0 and
C - 1), cu_seqlens with lengths that are not multiples of C and an empty sequence, a 10-chunk
call, cotangents on o only or on parts of the state; the call chunks walked as sub-chunks
(chunk 128, and 64 / 128 at D = 128), with offsets past a sub-chunk; that the kernel runs (not
the reference's VJP), that it is deterministic, and that a CUDA graph replays it."""
import itertools

import pytest
import torch

from conftest import make_inputs, make_weights, needs_kernels
from test_gpu_chunked_bwd import (HEADS, _assert_grads, _grads, call_rows,
                                  check_compiled_equals_eager, check_direct_equals_ops,
                                  check_graph_replay)
from test_gpu_decode import _random_state
from titans_cuda import MemoryState, neural_memory
from titans_cuda.ops.neural_memory import ops as nm_ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
# (D = 128: chunks 16 and 32, as a cluster of 4 CTAs, the only way its state fits)
DC = ((32, 16), (32, 32), (32, 64), (64, 16), (64, 32), (64, 64), (128, 16), (128, 32))
KINDS = ("fresh", "open", "varlen")
# every (D, C) x dtype x read, the kinds and heads cycled so that each pair meets each kind
GRID = [(d, c, dtype, read, KINDS[i % 3], HEADS[i % 4], i % 2 == 0)
        for i, ((d, c), dtype, read) in enumerate(itertools.product(
            DC, (torch.bfloat16, torch.float16), ("token", "chunk")))]
GRID += [(d, c, dtype, read, kind, HEADS[(i + 1) % 4], False)
         for i, ((d, c), dtype, read, kind) in enumerate(itertools.product(
             ((64, 64), (32, 16)), (torch.bfloat16,), ("token", "chunk"), KINDS))]
# fp32 inputs (every product of the depth-1 kernels is fp32; SPEC §7's 1e-5)
GRID += [(d, c, torch.float32, read, kind, HEADS[i % 4], i % 2 == 0)
         for i, ((d, c), read, kind) in enumerate(itertools.product(
             ((32, 16), (64, 64), (128, 32)), ("token", "chunk"), ("fresh", "open", "varlen")))]
GRID += [(64, 64, torch.bfloat16, "token", "long", HEADS[1], True),
         (32, 32, torch.float16, "chunk", "long", HEADS[2], False),
         (128, 32, torch.bfloat16, "token", "long", HEADS[1], True)]


def _id(c):
    d, ch, dtype, read, kind, (res, ln, bias), forget1 = c
    return (f"D{d}-C{ch}-{str(dtype).split('.')[-1]}-{read}-{kind}-{'res' if res else 'nores'}-"
            f"{'ln' + ('b' if bias else '') if ln else 'noln'}{'-reset' if forget1 else ''}")


def _case1(case, H=2):
    """Inputs of a depth-1 call: (args, weights, state, neural_memory kwargs, cu_seqlens)."""
    D, C, dtype, read, kind, (residual, ln, bias), reset = case
    B, T, N, cu = call_rows(kind, C)
    q, k, v, lr, forget, momentum = make_inputs(B, T, H, D, dtype=torch.float32, device=DEV)
    if reset:
        forget[0, T - 2, 1] = 1.0  # alpha = 1: the memory erased
    weights = make_weights(H, D, D, 1, dtype=torch.float32, device=DEV)
    st = _random_state(N, H, weights, C) if kind in ("open", "varlen") else None
    mem = dict(chunk_size=C, activation="silu", residual=residual, read=read,
               ln_weight=(1 + 0.2 * torch.randn(H, D, device=DEV)) if ln else None,
               ln_bias=(0.2 * torch.randn(H, D, device=DEV)) if ln and bias else None)
    return [t.to(dtype) for t in (q, k, v)] + [lr, forget, momentum], weights, st, mem, cu


def _check(case, **kw):
    args, weights, st, mem, cu = _case1(case)
    assert nm_ops.chunked_bwd_reason(args[0], weights, mem["chunk_size"], cu, st,
                                     mem["read"]) is None
    g = _grads(args, weights, st, mem, cu, "cuda", **kw)
    g32 = _grads(args, weights, st, mem, cu, "torch", torch.float32, **kw)
    g64 = _grads(args, weights, st, mem, cu, "torch", torch.float64, **kw)
    _assert_grads(g, g64, g32, args[0].dtype, f" ({_id(case)})")


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_depth1_backward_matches_reference(case):
    needs_kernels()
    _check(case)


COTS = ((), ("weights",), ("chunk_weights",), ("weights", "momentum"))


@pytest.mark.parametrize("cot_states", COTS, ids=lambda c: "o+" + "+".join(c) if c else "o")
@pytest.mark.parametrize("kind", KINDS)
def test_depth1_backward_partial_cotangents(kind, cot_states):
    needs_kernels()
    _check((64, 32, torch.bfloat16, "token", kind, HEADS[1], False), cot_states=cot_states)


@pytest.mark.parametrize("case", [(64, 64, torch.bfloat16, "token", "open", HEADS[1], True),
                                  (64, 128, torch.bfloat16, "chunk", "open", HEADS[1], True)],
                         ids=["C64", "C128-sub-chunks"])
def test_depth1_backward_is_taken_and_deterministic(case, monkeypatch):
    """The kernel runs (the reference's VJP is never called), the forward kept every chunk's
    start state and no z2 / fk, and two runs agree bit for bit (also over sub-chunks)."""
    needs_kernels()
    args, weights, st, mem, cu = _case1(case)

    def boom(*a, **k):
        raise AssertionError("the reference's VJP ran")
    monkeypatch.setattr(nm_ops, "_reference_grads", boom)
    assert nm_ops._kept_every(args[0], weights, case[1], cu, st, case[3], 4) == 1
    g1 = _grads(args, weights, st, mem, cu, "cuda")
    g2 = _grads(args, weights, st, mem, cu, "cuda")
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.isfinite(a).all() and torch.equal(a, b)


def test_depth1_backward_cuda_graph_capture_and_replay():
    """_fused_grads at depth 1 captured once and replayed on new inputs equals the eager
    gradients bit for bit."""
    needs_kernels()
    check_graph_replay(_case1, (64, 32, torch.float16, "token", "fresh", HEADS[1], False))


@pytest.mark.parametrize("C", (32, 128))
def test_depth1_opcheck_chunked_op_keeping_checkpoints(C):
    """The chunked op at depth 1 with checkpoints kept: every chunk's state (K = 1; at chunk 128
    every sub-chunk's of 64, sub-chunk 2's the state after the first call chunk) and empty
    z2 / fk outputs, in the real and the fake implementation (opcheck), autograd through the
    depth-1 backward on them."""
    needs_kernels()
    args, weights, _, mem, cu = _case1((64, C, torch.bfloat16, "token", "fresh", HEADS[1],
                                        False))
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t
              for t in args]
    op_args = (*leaves, list(weights), mem["ln_weight"], mem["ln_bias"], [], [], [], None, C,
               mem["activation"], mem["residual"], 1e-6, "token", cu,
               nm_ops.FUSED_BWD_CHECKPOINT_EVERY)
    outs = nm_ops.chunked_op(*op_args)
    ckpts = outs[4:]
    assert ckpts[0].numel() > 0 and ckpts[1].numel() > 0  # W, S at every chunk start
    # (every slot written: opcheck compares them)
    assert ckpts[0].shape[0] == -(-args[0].shape[1] // min(C, 64))
    assert ckpts[2].numel() == 0 and ckpts[3].numel() == 0  # no z2, fk at depth 1
    if C == 128:  # sub-chunk 2 is call chunk 1's start: the state after the first 128 tokens
        with torch.no_grad():
            _, st1 = neural_memory(*(t[:, :128] for t in args), weights, output_final_state=True,
                                   backend="cuda", **mem)
        # (one call chunk natively against two sub-chunks: the same math, other rounding)
        torch.testing.assert_close(ckpts[0][2], st1.weights[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ckpts[1][2], st1.momentum[0], rtol=1e-4, atol=1e-5)
    torch.library.opcheck(nm_ops.chunked_op, op_args)


@pytest.mark.parametrize("kind", KINDS)
def test_depth1_direct_path_equals_the_ops(kind, monkeypatch):
    """Eager calls (_Direct) and the registered ops (TITANS_EAGER_DIRECT=0's path, which keeps
    the checkpoints as the op's extra outputs) give the same gradients bit for bit."""
    needs_kernels()
    check_direct_equals_ops(*_case1((64, 64, torch.float16, "chunk", kind, HEADS[1], True)),
                            monkeypatch)


def test_depth1_torch_compile_fullgraph_forward_and_backward():
    """neural_memory at depth 1 compiled whole (fullgraph; the ops under Dynamo): the output and
    every gradient equal eager's."""
    needs_kernels()
    args, weights, _, mem, _ = _case1((64, 64, torch.bfloat16, "token", "fresh", HEADS[1],
                                       False))
    check_compiled_equals_eager(args, weights, mem)


# the depth-1 backward's clusters: CTA r owns the output columns [r D / s, (r + 1) D / s) of W;
# the LayerNorm rows, the row sums, mm and q̄ / k̄ cross the cluster
SPLIT_CASES = [(64, 64, torch.bfloat16, "token", "fresh", HEADS[1], True),
               (64, 32, torch.float16, "chunk", "open", HEADS[2], False),
               (64, 16, torch.bfloat16, "token", "varlen", HEADS[3], False),
               (32, 64, torch.float16, "token", "open", HEADS[1], False),
               (32, 16, torch.bfloat16, "chunk", "fresh", HEADS[0], False),
               (64, 64, torch.float16, "token", "long", HEADS[2], False)]


@pytest.mark.parametrize("split", (1, 2, 4))
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[_id(c) for c in SPLIT_CASES])
def test_depth1_backward_forced_splits(case, split, monkeypatch):
    """Each cluster size the launcher may take (at most D / 16 CTAs), forced, against float64."""
    needs_kernels()
    if split > case[0] // 16:
        pytest.skip(f"D = {case[0]} takes at most {case[0] // 16} CTAs")
    monkeypatch.setattr(nm_ops, "FUSED_BWD_SPLIT", split)
    _check(case)


def test_depth1_launcher_takes_the_cluster_it_documents(monkeypatch):
    """A small call (4 pairs) takes clusters of 4 at D = 64 on sm_90+ (params.h): the default
    call's gradients are those of split 4 bit for bit, and not split 1's."""
    needs_kernels()
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90+")
    case = (64, 32, torch.bfloat16, "token", "open", HEADS[1], False)
    args, weights, st, mem, cu = _case1(case)

    def grads(split):
        monkeypatch.setattr(nm_ops, "FUSED_BWD_SPLIT", split)
        return _grads(args, weights, st, mem, cu, "cuda")
    auto, four, one = grads(0), grads(4), grads(1)
    for a, b in zip(auto, four):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(auto, one))


def test_depth1_bad_split_raises(monkeypatch):
    """A cluster the depth-1 backward does not take (3, or more than D / 16; at D = 128 anything
    but 4) is an error, not a wrong result."""
    needs_kernels()
    for d, bads in ((32, (3, 4, -2)), (128, (1, 2, 3, -4))):
        args, weights, st, mem, cu = _case1((d, 32, torch.bfloat16, "token", "fresh", HEADS[1],
                                             False))
        for bad in bads:
            monkeypatch.setattr(nm_ops, "FUSED_BWD_SPLIT", bad)
            with pytest.raises(RuntimeError):
                _grads(args, weights, st, mem, cu, "cuda")


def test_depth1_d128_forced_four_is_the_default(monkeypatch):
    """D = 128 always runs as a cluster of 4: forcing 4 gives the default call's bits."""
    needs_kernels()
    args, weights, st, mem, cu = _case1((128, 16, torch.float16, "token", "open", HEADS[2],
                                         False))
    auto = _grads(args, weights, st, mem, cu, "cuda")
    monkeypatch.setattr(nm_ops, "FUSED_BWD_SPLIT", 4)
    four = _grads(args, weights, st, mem, cu, "cuda")
    for a, b in zip(auto, four):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


# Sub-chunks (nm_ops.bwd_chunking at depth 1): chunk 128 at D 32 / 64 as 2 x 64,
# chunks 64 and 128 at D 128 as 2 / 4 x 32, the forward that keeps the checkpoints walking the
# same sub-chunks (_ckpt_chunking). A sub-chunk past its call chunk's first takes its gradient
# at (and for read "chunk" reads through) the call chunk's start weights, whose cotangent goes
# to the carry and reaches W̄ at the call chunk's first sub-chunk (wg0 in the call's first
# chunk). Every (D, C) x dtype x read x kind, and two 10-chunk calls with LayerNorm.
SUB_DC = ((32, 128), (64, 128), (128, 64), (128, 128))
SUB_GRID = [(d, c, dtype, read, kind, HEADS[i % 4], i % 2 == 0)
            for i, ((d, c), dtype, read, kind) in enumerate(itertools.product(
                SUB_DC, (torch.bfloat16, torch.float16), ("token", "chunk"), KINDS))]
SUB_GRID += [(64, 128, torch.bfloat16, "token", "long", HEADS[1], True),
             (128, 64, torch.float16, "chunk", "long", HEADS[3], False)]
# fp32 inputs (their forward, the depth-1 fp32 kernel, walks the same sub-chunks; SPEC's 1e-5)
SUB_GRID += [(d, c, torch.float32, read, kind, HEADS[i % 4], i % 2 == 1)
             for i, ((d, c), read, kind) in enumerate(zip(
                 SUB_DC, ("token", "chunk") * 2, ("open", "varlen", "fresh", "open")))]
assert len(SUB_GRID) == 54


@pytest.mark.parametrize("case", SUB_GRID, ids=[_id(c) for c in SUB_GRID])
def test_depth1_backward_sub_chunks(case, monkeypatch):
    """The depth-1 backward over sub-chunks against float64; the kernel runs (never the
    reference's VJP)."""
    needs_kernels()
    d, c = case[:2]
    assert nm_ops.bwd_chunking(d, c)[1] > 1
    assert not nm_ops.chunked_bwd_shape_supported(d, d, 1, c, case[3])

    def boom(*a, **k):
        raise AssertionError("the reference's VJP ran")
    monkeypatch.setattr(nm_ops, "_reference_grads", boom)
    _check(case)


@pytest.mark.parametrize("read", ("token", "chunk"))
@pytest.mark.parametrize("split", (1, 2, 4))
@pytest.mark.parametrize("dc", ((64, 128), (128, 128)), ids=lambda dc: f"D{dc[0]}-C{dc[1]}")
def test_depth1_backward_sub_chunks_offsets_splits(dc, split, read, monkeypatch):
    """Sub-chunks with initial states whose open chunks start past a sub-chunk (offsets C - 3,
    C / 2 + 1: leading sub-chunks without tokens), inside the first (1) and at 0; over each
    column split (D 128: clusters of 4 only); both reads."""
    needs_kernels()
    d, c = dc
    if d == 128 and split != 4:
        pytest.skip("D = 128 runs as clusters of 4 only")
    if split > 1 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90+")
    args, weights, _, mem, cu = _case1((d, c, torch.bfloat16, read, "fresh", HEADS[1], False))
    N = args[0].shape[0]
    st = _random_state(N, 2, weights, c)
    for offs in ([c - 3, c // 2 + 1], [1, 0]):
        s = MemoryState(st.weights, st.momentum, st.chunk_weights,
                        torch.tensor(offs[:N], device=DEV))
        g64 = _grads(args, weights, s, mem, cu, "torch", torch.float64)
        g32 = _grads(args, weights, s, mem, cu, "torch", torch.float32)
        with monkeypatch.context() as m:
            m.setattr(nm_ops, "FUSED_BWD_SPLIT", split)
            g = _grads(args, weights, s, mem, cu, "cuda")
        _assert_grads(g, g64, g32, args[0].dtype,
                      f" (D {d}, C {c}, offsets {offs}, split {split})")
