"""The chunked reference (the dual form, loops over chunks only) against the per-token oracle
written straight from SPEC §2, in float64: outputs, final states and every gradient to 1e-9."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import make_inputs, make_weights, rel_err
from oracle import neural_memory_oracle
from titans_cuda import MemoryState, neural_memory
from titans_cuda.ops.neural_memory import reference as ref

TOL = 1e-9


def _config(seed):
    """A random configuration covering every option of SPEC §5."""
    rng = random.Random(seed)
    T = rng.choice([1, 2, 5, 9, 12, 17])
    C = rng.choice([1, 2, 3, 4, 5, 8, 16, 32])
    varlen = rng.random() < 0.25
    return dict(
        B=1 if varlen else rng.choice([1, 2, 3]), T=T, H=rng.choice([1, 2, 3]),
        D=rng.choice([3, 4, 8]), expansion=rng.choice([1, 2]), depth=rng.choice([1, 2, 2, 3]),
        chunk_size=C, activation=rng.choice(["silu", "gelu"]), residual=rng.random() < 0.5,
        ln=rng.choice([None, "weight", "weight+bias"]), read=rng.choice(["token", "chunk"]),
        state=rng.random() < 0.4, varlen=varlen)


CONFIGS = [_config(s) for s in range(48)]
# the corners named by the issue, explicitly
CONFIGS += [
    dict(B=2, T=12, H=2, D=4, expansion=2, depth=2, chunk_size=1, activation="silu",
         residual=True, ln="weight+bias", read="token", state=False, varlen=False),   # C = 1
    dict(B=2, T=7, H=2, D=4, expansion=2, depth=2, chunk_size=7, activation="gelu",
         residual=False, ln=None, read="token", state=False, varlen=False),           # C = T
    dict(B=1, T=9, H=2, D=4, expansion=1, depth=2, chunk_size=64, activation="gelu",
         residual=True, ln="weight", read="chunk", state=True, varlen=False),         # C > T
    dict(B=1, T=13, H=3, D=5, expansion=2, depth=2, chunk_size=4, activation="silu",
         residual=True, ln="weight+bias", read="token", state=True, varlen=True),     # varlen
]


def _ids(c):
    return (f"B{c['B']}T{c['T']}H{c['H']}D{c['D']}x{c['expansion']}L{c['depth']}C{c['chunk_size']}"
            f"-{c['activation']}-{'res' if c['residual'] else 'nores'}-ln{c['ln']}-{c['read']}"
            f"{'-state' if c['state'] else ''}{'-varlen' if c['varlen'] else ''}")


def build_case(c, dtype=torch.float64, special=None):
    B, T, H, D = c["B"], c["T"], c["H"], c["D"]
    # large lr makes a deep memory diverge (no LayerNorm) or grow W until the output is a
    # cancellation of large terms (LayerNorm): draw lr where the problem is well conditioned
    q, k, v, lr, forget, momentum = make_inputs(B, T, H, D, dtype,
                                                lr_max=0.3 if c["ln"] else 0.2)
    if special == "lr0":
        lr.zero_()
    elif special == "eta0":
        momentum.zero_()
    elif special == "alpha1":
        forget.fill_(1.0)
    weights = make_weights(H, D, c["expansion"] * D, c["depth"], dtype)
    kw = dict(chunk_size=c["chunk_size"], activation=c["activation"], residual=c["residual"],
              read=c["read"])
    if c["ln"]:
        kw["ln_weight"] = 1.0 + 0.3 * torch.randn(H, D, dtype=dtype)
        if c["ln"] == "weight+bias":
            kw["ln_bias"] = 0.3 * torch.randn(H, D, dtype=dtype)
    if c["varlen"]:
        cuts = sorted(random.sample(range(T + 1), k=min(2, T + 1)))
        lens = [cuts[0], cuts[1] - cuts[0], T - cuts[1]] if len(cuts) == 2 else [T]
        kw["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)),
                                        dtype=torch.int32)
    n_seq = B if not c["varlen"] else kw["cu_seqlens"].numel() - 1
    if c["state"]:
        shapes = [w.shape[1:] for w in weights]
        rnd = lambda: tuple(0.5 * torch.randn(n_seq, H, *s, dtype=dtype) / s[0] ** 0.5  # noqa
                            for s in shapes)
        offset = torch.randint(0, c["chunk_size"], (n_seq,))
        kw["initial_state"] = MemoryState(tuple(w + x for w, x in zip(weights, rnd())), rnd(),
                                          tuple(w + x for w, x in zip(weights, rnd())), offset)
    return (q, k, v, lr, forget, momentum, weights), kw


def _state_tensors(st):
    if isinstance(st, MemoryState):
        return list(st.weights + st.momentum + st.chunk_weights), st.offset
    return list(st[0] + st[1] + st[2]), st[3]


@pytest.mark.parametrize("c", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_forward_and_state_match_oracle(c):
    args, kw = build_case(c)
    o, st = neural_memory(*args, **kw, output_final_state=True, backend="torch")
    o_ref, st_ref = neural_memory_oracle(*args, **kw)
    assert torch.isfinite(o_ref).all(), "inputs outside the stable regime make a vacuous test"
    assert o.dtype == torch.float64 and o.shape == args[0].shape
    assert rel_err(o, o_ref) < TOL
    got, off = _state_tensors(st)
    want, off_ref = _state_tensors(st_ref)
    assert off.tolist() == off_ref.tolist()
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("special", ["lr0", "eta0", "alpha1"])
def test_gate_corners_match_oracle(special):
    c = dict(B=2, T=11, H=2, D=4, expansion=2, depth=2, chunk_size=4, activation="gelu",
             residual=True, ln="weight+bias", read="token", state=True, varlen=False)
    args, kw = build_case(c, special=special)
    o, st = neural_memory(*args, **kw, output_final_state=True, backend="torch")
    o_ref, st_ref = neural_memory_oracle(*args, **kw)
    assert rel_err(o, o_ref) < TOL
    for a, b in zip(_state_tensors(st)[0], _state_tensors(st_ref)[0]):
        assert rel_err(a, b) < TOL
    if special == "lr0":  # no writes: W decays and S decays, nothing else
        w0 = kw["initial_state"].weights[0]
        assert not torch.allclose(st.weights[0], w0)


def _all_grads(fn, args, kw, cotangents=None):
    """Gradients of a random linear functional of (o, final state) w.r.t. every float input."""
    leaves = {}

    def leaf(name, t):
        t = t.detach().clone().requires_grad_(True)
        leaves[name] = t
        return t
    names = ["q", "k", "v", "lr", "forget", "momentum"]
    a = [leaf(n, t) for n, t in zip(names, args[:6])]
    w = tuple(leaf(f"weights{i}", t) for i, t in enumerate(args[6]))
    kw = dict(kw)
    for n in ("ln_weight", "ln_bias"):
        if kw.get(n) is not None:
            kw[n] = leaf(n, kw[n])
    st = kw.get("initial_state")
    if st is not None:
        kw["initial_state"] = MemoryState(
            tuple(leaf(f"state.w{i}", t) for i, t in enumerate(st.weights)),
            tuple(leaf(f"state.s{i}", t) for i, t in enumerate(st.momentum)),
            tuple(leaf(f"state.cw{i}", t) for i, t in enumerate(st.chunk_weights)), st.offset)
    o, st_out = fn(*a, w, **kw)
    outs = [o] + _state_tensors(st_out)[0]
    if cotangents is None:
        cotangents = [torch.randn_like(x) for x in outs]
    loss = sum((x * ct).sum() for x, ct in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return dict(zip(leaves, grads)), cotangents


GRAD_CONFIGS = CONFIGS[:12] + CONFIGS[-4:]


@pytest.mark.parametrize("c", GRAD_CONFIGS, ids=[_ids(c) for c in GRAD_CONFIGS])
def test_every_gradient_matches_oracle(c):
    args, kw = build_case(c)

    def ours(*a, **k):
        return neural_memory(*a, **k, output_final_state=True, backend="torch")
    g, cot = _all_grads(ours, args, kw)
    g_ref, _ = _all_grads(neural_memory_oracle, args, kw, cot)
    assert all(torch.isfinite(x).all() for x in g_ref.values() if x is not None), \
        "inputs outside the stable regime make a vacuous test"
    assert set(g) == set(g_ref)
    for name in g:
        a, b = g[name], g_ref[name]
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert a is not None, name
        assert rel_err(a, b) < TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("read", ("token", "chunk"))
@pytest.mark.parametrize("parts", (2, 4))
def test_a_chunk_runs_as_sub_chunks_at_its_start_weights(read, parts):
    """What the kernels' sub-chunks rely on (params.h, sub): one chunk step of C slots equals
    `parts` steps of C / parts slots in turn, each taking its gradient at the chunk's start
    weights (wg) and starting from the state the previous one left, in outputs, final state
    and every gradient (float64). The slots before an offset are inactive, one sub-chunk
    entirely (it passes the state through)."""
    torch.manual_seed(7)
    N, H, D, hid, C = 2, 2, 8, 16, 16
    dt = torch.float64
    q, k, v = (torch.randn(N, H, C, D, dtype=dt) for _ in range(3))
    lr = 0.5 * torch.rand(N, H, C, dtype=dt)
    decay = 1 - torch.rand(N, H, C, dtype=dt)
    decay[0, 1, 11] = 0.0  # alpha = 1: a reset inside the second half
    eta = torch.rand(N, H, C, dtype=dt)
    active = torch.ones(N, 1, C, dtype=dt)
    active[1, :, :C // parts + 1] = 0  # an offset past the first sub-chunk
    inactive = active.expand(N, H, C) == 0
    lr, decay, eta = lr.masked_fill(inactive, 0), decay.masked_fill(inactive, 1), \
        eta.masked_fill(inactive, 1)
    w0 = [0.3 * torch.randn(N, H, D, hid, dtype=dt), 0.3 * torch.randn(N, H, hid, D, dtype=dt)]
    s0 = [0.1 * torch.randn_like(t) for t in w0]
    wg = [t + 0.1 * torch.randn_like(t) for t in w0]  # an open chunk's weights
    mlp = dict(activation="gelu", residual=True, ln_weight=1 + 0.2 * torch.randn(H, 1, D, dtype=dt),
               ln_bias=0.2 * torch.randn(H, 1, D, dtype=dt), ln_eps=1e-6)
    leaves = [q, k, v, lr, decay, eta, *w0, *s0, *wg]
    for t in leaves:
        t.requires_grad_(True)

    def whole():
        return ref.chunk_step(q, k, v, lr, decay, eta, active, w0, s0, wg, mlp=mlp, read=read)

    def in_parts():
        w, s, outs, n = w0, s0, [], C // parts
        for i in range(parts):
            sl = slice(i * n, (i + 1) * n)
            o, w, s = ref.chunk_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[..., sl],
                                     decay[..., sl], eta[..., sl], active[..., sl], w, s, wg,
                                     mlp=mlp, read=read)
            outs.append(o)
        return torch.cat(outs, dim=2), w, s

    cot = torch.randn(N, H, C, D, dtype=dt) * active.expand(N, H, C).unsqueeze(-1)
    results = []
    for fn in (whole, in_parts):
        o, w, s = fn()
        loss = (o * cot).sum() + sum((t * (i + 1)).sum() for i, t in enumerate(w + s))
        results.append((o * active.expand(N, H, C).unsqueeze(-1), w, s,
                        torch.autograd.grad(loss, leaves)))
    (o1, w1, s1, g1), (o2, w2, s2, g2) = results
    assert rel_err(o2, o1) < 1e-12
    for a, b in zip(w2 + s2, w1 + s1):
        assert rel_err(a, b) < 1e-12
    for i, (a, b) in enumerate(zip(g2, g1)):
        assert rel_err(a, b) < 1e-10, i
