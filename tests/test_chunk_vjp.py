"""The hand-written adjoints (ops/neural_memory/chunk_vjp.py, the fused backward kernel's
blueprint) against autograd through the reference, in float64: one chunk (every input's
cotangent, depth 1-3, both reads, LayerNorm +- bias, residual, silu/gelu, inactive slots at both
ends of the chunk, gates with exact zeros) and whole calls (dense, initial states with offsets,
cu_seqlens with an empty sequence; cotangents on o and on the whole final state); and the
backward kernel's blocked plan (chunk_vjp_blocked.py) against chunk_vjp."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import rel_err
from titans_cuda.ops.neural_memory import chunk_vjp, chunk_vjp_blocked, reference as ref

CASES = list(itertools.product((1, 2, 3), ("token", "chunk"), ("none", "ln", "lnb"),
                               (False, True), ("silu", "gelu")))


def _inputs(depth, ln, residual, act, N=2, H=2, C=6, D=4, hidden=5):
    dt = torch.float64
    q, k, v = (torch.randn(N, H, C, D, dtype=dt) for _ in range(3))
    lr = torch.rand(N, H, C, dtype=dt)
    decay = 1 - torch.rand(N, H, C, dtype=dt) ** 2
    eta = torch.rand(N, H, C, dtype=dt)
    decay[0, 0, 2] = 0.0  # alpha = 1: a reset inside the chunk
    eta[1, 1, 3] = 0.0
    lr[0, 1, 1] = 0.0
    active = torch.ones(N, 1, C, dtype=dt)
    active[0, 0, 0] = 0.0  # an offset slot before the sequence
    active[1, 0, -2:] = 0.0  # slots after it
    lr, decay, eta = (torch.where(active.bool(), g, torch.full_like(g, f))
                      for g, f in ((lr, 0.0), (decay, 1.0), (eta, 1.0)))
    dims = [D] + [hidden] * (depth - 1) + [D]
    shapes = list(zip(dims[:-1], dims[1:]))
    w0 = [torch.randn(N, H, a, b, dtype=dt) / a ** 0.5 for a, b in shapes]
    s0 = [0.3 * torch.randn(N, H, a, b, dtype=dt) for a, b in shapes]
    wg = [w + 0.1 * torch.randn_like(w) for w in w0]
    mlp = dict(activation=act, residual=residual,
               ln_weight=(1 + 0.2 * torch.randn(H, 1, D, dtype=dt)) if ln != "none" else None,
               ln_bias=(0.2 * torch.randn(H, 1, D, dtype=dt)) if ln == "lnb" else None,
               ln_eps=1e-6)
    return [q, k, v, lr, decay, eta], active, w0, s0, wg, mlp


@pytest.mark.parametrize("depth,read,ln,residual,act", CASES)
def test_chunk_vjp_matches_autograd(depth, read, ln, residual, act):
    xs, active, w0, s0, wg, mlp = _inputs(depth, ln, residual, act)
    params = [p for p in (mlp["ln_weight"], mlp["ln_bias"]) if p is not None]
    leaves = [t.clone().requires_grad_(True) for t in (*xs, *w0, *s0, *wg, *params)]
    L = depth
    q, k, v, lr, decay, eta = leaves[:6]
    lw0, ls0, lwg = leaves[6:6 + L], leaves[6 + L:6 + 2 * L], leaves[6 + 2 * L:6 + 3 * L]
    lmlp = dict(mlp)
    if params:
        lmlp["ln_weight"] = leaves[6 + 3 * L]
        lmlp["ln_bias"] = leaves[6 + 3 * L + 1] if len(params) == 2 else None
    o, w_new, s_new = ref.chunk_step(q, k, v, lr, decay, eta, active, lw0, ls0, lwg, mlp=lmlp,
                                     read=read)
    o_bar = torch.randn_like(o)
    w_bar = [torch.randn_like(w) for w in w_new]
    s_bar = [torch.randn_like(s) for s in s_new]
    want = torch.autograd.grad([o, *w_new, *s_new], leaves, [o_bar, *w_bar, *s_bar],
                               allow_unused=True)
    got = chunk_vjp.chunk_step_vjp(*xs, active, w0, s0, wg, o_bar, w_bar, s_bar, mlp=mlp,
                                   read=read)
    flat = [got["q"], got["k"], got["v"], got["lr"], got["decay"], got["eta"], *got["w0"],
            *got["s0"], *got["wg"]] + ([got["ln_weight"]] if params else []) + (
            [got["ln_bias"]] if len(params) == 2 else [])
    names = ["q", "k", "v", "lr", "decay", "eta"] + [f"{n}{i}" for n in ("w0", "s0", "wg")
                                                   for i in range(L)] + ["ln_w", "ln_b"]
    for name, a, b in zip(names, flat, want):
        b = torch.zeros_like(a) if b is None else b
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert rel_err(a, b) < 1e-9, (name, rel_err(a, b))


SEQ_CASES = [("dense", 2, "token", "lnb"), ("dense", 1, "chunk", "ln"), ("state", 2, "token", "ln"),
             ("state", 1, "token", "none"), ("packed", 2, "token", "lnb"),
             ("packed", 2, "chunk", "none"), ("packed-state", 2, "token", "ln")]


def _seq_setup(kind, depth, ln, read):
    """Inputs of a whole call for sequence_vjp: (xs, weights, state, gamma, beta, keywords)."""
    from conftest import make_inputs, make_weights
    from titans_cuda import MemoryState
    dt, C, H, D, hidden = torch.float64, 4, 2, 4, 6
    packed = kind.startswith("packed")
    lengths = [7, 0, 3, 9] if packed else None
    B, T = (1, sum(lengths)) if packed else (2, 11)
    n_seq = len(lengths) if packed else B
    cu = torch.tensor([0] + list(itertools.accumulate(lengths))) if packed else None
    xs = list(make_inputs(B, T, H, D, dtype=dt))
    weights = list(make_weights(H, D, hidden, depth, dtype=dt))
    st = None
    if kind in ("state", "packed-state"):
        w = [t.unsqueeze(0).expand(n_seq, *t.shape) + 0.1 * torch.randn(n_seq, *t.shape,
                                                                         dtype=dt)
             for t in weights]
        st = MemoryState(tuple(w), tuple(0.1 * torch.randn_like(t) for t in w),
                         tuple(t + 0.1 * torch.randn_like(t) for t in w),
                         torch.tensor([3, 0, 1, 2][:n_seq]))
    gam = (1 + 0.2 * torch.randn(H, D, dtype=dt)) if ln != "none" else None
    bet = (0.2 * torch.randn(H, D, dtype=dt)) if ln == "lnb" else None
    kw = dict(chunk_size=C, activation="gelu", residual=True, ln_eps=1e-6, read=read,
              cu_seqlens=cu)
    return xs, weights, st, gam, bet, kw


@pytest.mark.parametrize("kind,depth,read,ln", SEQ_CASES)
def test_sequence_vjp_matches_autograd(kind, depth, read, ln):
    """The backward's outer loop (chunks in reverse, the state's cotangents carried, the final
    chunk weights' cotangent owed to each sequence's last chunk) against autograd through the
    reference: every input, the learned weights or every initial-state tensor, LayerNorm."""
    from titans_cuda import MemoryState
    xs, weights, st, gam, bet, kw = _seq_setup(kind, depth, ln, read)
    state_leaves = [] if st is None else [*st.weights, *st.momentum, *st.chunk_weights]
    ln_leaves = [p for p in (gam, bet) if p is not None]
    leaves = [t.clone().requires_grad_(True) for t in (*xs, *weights, *state_leaves, *ln_leaves)]
    lx, lw = leaves[:6], leaves[6:6 + depth]
    rest = leaves[6 + depth:]
    lst = None
    if st is not None:
        lst = MemoryState(tuple(rest[:depth]), tuple(rest[depth:2 * depth]),
                          tuple(rest[2 * depth:3 * depth]), st.offset)
        rest = rest[3 * depth:]
    lg = rest[0] if gam is not None else None
    lb = rest[1] if bet is not None else None
    o, fs = ref.neural_memory(*lx, tuple(lw), ln_weight=lg, ln_bias=lb, initial_state=lst,
                              output_final_state=True, **kw)
    o_bar = torch.randn_like(o)
    sbar = [[torch.randn_like(t) for t in f] for f in (fs.weights, fs.momentum,
                                                         fs.chunk_weights)]
    outs = [o, *fs.weights, *fs.momentum, *fs.chunk_weights]
    cots = [o_bar, *sbar[0], *sbar[1], *sbar[2]]
    want = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    got = chunk_vjp.sequence_vjp(*xs, weights, ln_weight=gam, ln_bias=bet, initial_state=st,
                                 o_bar=o_bar, state_bar=sbar, **kw)
    flat = [got[n] for n in ("q", "k", "v", "lr", "forget", "momentum")] + got["weights"]
    if st is not None:
        flat += [t for f in got["state"] for t in f]
    flat += [got[n] for n, p in (("ln_weight", gam), ("ln_bias", bet)) if p is not None]
    assert len(flat) == len(want)
    for i, (a, b) in enumerate(zip(flat, want)):
        b = torch.zeros_like(a) if b is None else b
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert rel_err(a, b) < 1e-9, (i, rel_err(a, b))



@pytest.mark.parametrize("kind,read,ln", [(k, r, l) for k, _, r, l in SEQ_CASES if _ == 2])
def test_sequence_vjp_checkpoints_and_blocked_chunks(kind, read, ln):
    """The kernel's outer loop with checkpoints every K chunks (the walk back recomputes a
    group's chunk starts) gives the same bits as keeping every chunk's state, whatever K (1, 2,
    3, more than the chunks); with the blocked one-chunk adjoint (two hidden blocks over two
    CTAs) it agrees to 1e-12."""
    import functools
    xs, weights, st, gam, bet, kw = _seq_setup(kind, 2, ln, read)
    o_bar = torch.randn_like(xs[0])
    n_seq = xs[0].shape[0] if kw["cu_seqlens"] is None else kw["cu_seqlens"].numel() - 1
    sbar = [[torch.randn(n_seq, *w.shape, dtype=w.dtype) for w in weights] for _ in range(3)]
    args = dict(ln_weight=gam, ln_bias=bet, initial_state=st, o_bar=o_bar, state_bar=sbar, **kw)
    every = chunk_vjp.sequence_vjp(*xs, weights, **args)

    def flat(r):
        out = [r[n] for n in ("q", "k", "v", "lr", "forget", "momentum", "ln_weight",
                              "ln_bias")] + list(r["weights"])
        return [t for t in out + [t for f in (r["state"] or []) for t in f] if t is not None]
    for K in (2, 3, 100):
        got = chunk_vjp.sequence_vjp(*xs, weights, checkpoint_every=K, **args)
        for a, b in zip(flat(got), flat(every), strict=True):
            assert torch.equal(a, b), K
    blocked = functools.partial(chunk_vjp_blocked.chunk_step_vjp_blocked, block=3, split=2)
    got = chunk_vjp.sequence_vjp(*xs, weights, checkpoint_every=2, one_chunk_vjp=blocked, **args)
    for a, b in zip(flat(got), flat(every), strict=True):
        assert rel_err(a, b) < 1e-12, rel_err(a, b)
    with pytest.raises(ValueError, match="checkpoint_every"):
        chunk_vjp.sequence_vjp(*xs, weights, checkpoint_every=0, **args)

BLOCKED_CASES = list(itertools.product(("token", "chunk"), ("none", "ln", "lnb"), (False, True),
                                       ("silu", "gelu")))


@pytest.mark.parametrize("block,split", [(2, 1), (2, 2), (2, 3), (3, 2), (6, 1)])
@pytest.mark.parametrize("read,ln,residual,act", BLOCKED_CASES)
def test_blocked_chunk_vjp_matches_chunk_vjp(read, ln, residual, act, block, split):
    """The backward kernel's plan (chunk_vjp_blocked: hidden blocks spread over the CTAs of a
    cluster, partial sums at four synchronisation points) computes chunk_step_vjp's cotangents,
    for every block width and split, both reads and every head option."""
    xs, active, w0, s0, wg, mlp = _inputs(2, ln, residual, act, hidden=6)
    o_bar = torch.randn_like(xs[0])
    w_bar = [torch.randn_like(w) for w in w0]
    s_bar = [torch.randn_like(s) for s in s0]
    want = chunk_vjp.chunk_step_vjp(*xs, active, w0, s0, wg, o_bar, w_bar, s_bar, mlp=mlp,
                                    read=read)
    got = chunk_vjp_blocked.chunk_step_vjp_blocked(*xs, active, w0, s0, wg, o_bar, w_bar, s_bar,
                                                   mlp=mlp, read=read, block=block, split=split)
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        if b is None:
            assert a is None, name
            continue
        for i, (x, y) in enumerate(zip(a, b) if isinstance(b, list) else [(a, b)]):
            assert x.shape == y.shape, (name, i)
            assert rel_err(x, y) < 1e-12, (name, i, rel_err(x, y))


@pytest.mark.parametrize("same", [True, False], ids=["wg=w0", "wg!=w0"])
@pytest.mark.parametrize("block,split", [(2, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("ln,residual,act", [("none", False, "silu"), ("ln", True, "gelu"),
                                             ("lnb", True, "silu"), ("lnb", False, "gelu")])
def test_blocked_read_chunk_takes_the_token_walk(ln, residual, act, block, split, same):
    """Read "chunk" as the fused backward kernel computes it: read "token"'s walk through Wg's
    blocks with the read's row scales (1, 0) and its couplings to G multiplied by 0, the read's
    cotangent into W̄g. Equal to chunk_step_vjp's own read "chunk" adjoint (which runs q through
    M_Wg) for Wg = W0 (every chunk but an open one) and Wg != W0, and not to its read "token"
    (so the substitution is what makes the difference)."""
    xs, active, w0, s0, wg, mlp = _inputs(2, ln, residual, act, hidden=6)
    if same:
        wg = [w.clone() for w in w0]
    o_bar = torch.randn_like(xs[0])
    w_bar = [torch.randn_like(w) for w in w0]
    s_bar = [torch.randn_like(t) for t in s0]
    args = (*xs, active, w0, s0, wg, o_bar, w_bar, s_bar)
    want = chunk_vjp.chunk_step_vjp(*args, mlp=mlp, read="chunk")
    got = chunk_vjp_blocked.chunk_step_vjp_blocked(*args, mlp=mlp, read="chunk", block=block,
                                                   split=split)
    token = chunk_vjp.chunk_step_vjp(*args, mlp=mlp, read="token")
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        for x, y in zip(got[name], want[name]) if isinstance(want[name], list) else [
                (got[name], want[name])]:
            assert rel_err(x, y) < 1e-12, (name, rel_err(x, y))
    assert rel_err(got["q"], token["q"]) > 1e-3


def test_blocked_chunk_vjp_rejects_what_it_cannot_block():
    xs, active, w0, s0, wg, mlp = _inputs(2, "ln", True, "silu", hidden=6)
    bars = (torch.randn_like(xs[0]), w0, s0)
    with pytest.raises(ValueError, match="block=4"):
        chunk_vjp_blocked.chunk_step_vjp_blocked(*xs, active, w0, s0, wg, *bars, mlp=mlp,
                                                 read="token", block=4, split=1)
    with pytest.raises(ValueError, match="split"):
        chunk_vjp_blocked.chunk_step_vjp_blocked(*xs, active, w0, s0, wg, *bars, mlp=mlp,
                                                 read="token", block=2, split=4)
    d1 = _inputs(1, "ln", True, "silu")
    with pytest.raises(ValueError, match="depth 2"):
        chunk_vjp_blocked.chunk_step_vjp_blocked(*d1[0], d1[1], d1[2], d1[3], d1[4], *bars,
                                                 mlp=d1[5], read="token", block=2, split=1)


@pytest.mark.parametrize("active_ends", [False, True])
def test_gates_vjp_recurrences_match_the_matrix_form(active_ends):
    """The gates' adjoint by reverse-mode through the forward kernel's own column recurrences
    (one thread per column, O(C^2)) equals _Gates.vjp, with exact zeros in the gates and
    inactive slots; Ḡ, N̄ with entries above the diagonal (G, N are lower triangular)."""
    xs, active, *_ = _inputs(1, "none", False, "silu", C=7)
    lr, decay, eta = xs[3], xs[4], xs[5]
    if not active_ends:
        active = torch.ones_like(active)
    shape = lr.shape + (lr.shape[-1],)
    bars = [torch.randn(shape, dtype=lr.dtype), torch.randn(shape, dtype=lr.dtype)] + [
        torch.randn_like(lr) for _ in range(3)]
    want = chunk_vjp._Gates(lr, decay, eta, active).vjp(*bars)
    got = chunk_vjp.gates_vjp_recurrences(lr, decay, eta, active, *bars)
    for name, a, b in zip(("lr", "decay", "eta"), got, want):
        assert rel_err(a, b) < 1e-12, (name, rel_err(a, b))
