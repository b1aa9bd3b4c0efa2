"""Could the fused backward drop a plane from its products? A CPU emulation.

The fused backward takes every product with split-bf16 operands (x = hi + lo, three mma:
hi*hi + hi*lo + lo*hi, ~17 significant bits), which costs about a sixth of B = 8's forward +
backward against one-plane products (docs/perf_notes.md). This runs the backward's plan
(chunk_vjp.sequence_vjp) in float64 with the forward's products (the chunk steps and the
recomputed group starts) as the kernel's two planes, and the one-chunk adjoints' products
(everything the backward kernel multiplies, its recompute of the chunk's keys and read
included) in one of these forms, each operand first rounded to fp32:
  2 planes      hi*hi + hi*lo + lo*hi (the kernel today, three mma)
  A one plane   hi(A) * (B hi + B lo)  (two mma: the left operand's lo plane dropped)
  B one plane   (A hi + A lo) * hi(B)  (two mma)
  one plane     hi(A) * hi(B)          (one mma)
and prints each gradient's error against float64 next to the fp32 reference's own error, over
draws shaped like tests/test_gpu_chunked_bwd.py's (bf16 inputs: SPEC's bound is 2e-2, or the
tests' 256 times the fp32 reference's error where that is larger).

With --tf32, every product of the adjoints ("tf32 adjoints"), or every product of the
forward and the adjoints ("tf32 everywhere"), is one TF32 product (both operands rounded to
10 mantissa bits, fp32 accumulation) instead of split bf16: no packing, two thirds of the mma
work.

With --fp16, every product of the adjoints ("fp16 adjoints"), or of the forward and the
adjoints ("fp16 everywhere"), is one fp16 product (both operands rounded to fp16: 11
significant bits, but overflow past 65504 and gradual underflow below 6.1e-5) with fp32
accumulation: one mma and one conversion per operand instead of three and a split. Measured
(2026-11-28, docs/perf_notes.md v29): out of SPEC (an overflow to inf in one draw's adjoint;
1.7x the bound with the forward in fp16 too).

With --groups, one plane (both operands') is applied to one group of the adjoint's products
at a time, the others keeping two planes: the recompute of the chunk's keys and read (the
kernel's block_errors and C1, and what its forward keeps: fk, z2), the state's cotangent
products, the read's adjoint, the keys' errors' adjoint, the keys' forward adjoint, and last
all four adjoint groups at once. It prints each choice's worst error / bound: which products
could take one plane.

    python scripts/bwd_split_precision.py [draws]
    python scripts/bwd_split_precision.py --groups [draws]
    python scripts/bwd_split_precision.py --tf32 [draws]
    python scripts/bwd_split_precision.py --fp16 [draws]
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch

sys.path.insert(0, "tests")
from conftest import make_inputs, make_weights, rel_err  # noqa: E402
from titans_cuda.ops.neural_memory import chunk_vjp  # noqa: E402

_matmul = torch.matmul
NAMES = ("q", "k", "v", "lr", "forget", "momentum", "w1", "w2")


def _planes(x):
    x = x.to(torch.float32).to(torch.float64)
    hi = x.to(torch.bfloat16).to(torch.float64)
    return hi, (x - hi).to(torch.bfloat16).to(torch.float64)


def _tf32(x):
    """x rounded to TF32 (10 explicit mantissa bits, to nearest, ties away: cvt.rna.tf32)."""
    i = x.to(torch.float32).contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32).to(torch.float64)


def _fp16(x):
    """x rounded to fp16 (to nearest; overflow to inf, gradual underflow), as cvt.rn.f16."""
    return x.to(torch.float32).to(torch.float16).to(torch.float64)


def _mm(mode):
    def mm(a, b):
        if mode == "tf32":  # one TF32 product (mma .tf32), fp32 accumulation
            return _matmul(_tf32(a), _tf32(b)).to(torch.float32).to(torch.float64)
        if mode == "fp16":  # one fp16 product (mma .f16, one plane each), fp32 accumulation
            return _matmul(_fp16(a), _fp16(b)).to(torch.float32).to(torch.float64)
        (ah, al), (bh, bl) = _planes(a), _planes(b)
        if mode == "2 planes":
            acc = _matmul(ah, bh) + _matmul(ah, bl) + _matmul(al, bh)
        elif mode == "A one plane":
            acc = _matmul(ah, bh) + _matmul(ah, bl)
        elif mode == "B one plane":
            acc = _matmul(ah, bh) + _matmul(al, bh)
        else:
            acc = _matmul(ah, bh)
        return acc.to(torch.float32).to(torch.float64)
    return mm


GROUPS = ("recompute", "state", "read adjoint", "errors adjoint", "keys adjoint",
          "all adjoints")  # the last: every group but the recompute


def _group_lines():
    """chunk_step_vjp's source lines -> its product groups (by the section comments)."""
    starts = {"state": "# ---- state ----", "read": "# ---- read ----",
              "read adjoint": "z_bar = _head_backward(o_bar", "errors": "# ---- keys: the errors",
              "keys": "# the keys' forward, top down", "u": "u = torch.matmul("}
    src, first = inspect.getsourcelines(chunk_vjp.chunk_step_vjp)
    marks = {name: first + i for i, line in enumerate(src) for name, start in starts.items()
             if line.strip().startswith(start)}
    assert marks.keys() == starts.keys(), marks

    def group(frame):
        if frame.f_code.co_name != "chunk_step_vjp":
            return "recompute"  # forward_pass: the keys' forward
        ln = frame.f_lineno
        if ln == marks["u"] or ln < marks["state"] or marks["read"] <= ln < marks["read adjoint"]:
            return "recompute"
        if ln < marks["read"]:
            return "state"
        if ln < marks["errors"]:
            return "read adjoint"
        if ln < marks["keys"]:
            return "errors adjoint"
        return "keys adjoint"
    return group


def _mm_group(one_plane_group, group_of):
    two, one = _mm("2 planes"), _mm("one plane")

    def mm(a, b):
        g = group_of(sys._getframe(1))
        on = g == one_plane_group or (one_plane_group == "all adjoints" and g != "recompute")
        return (one if on else two)(a, b)
    return mm


def _patched(fn, mm):
    @functools.wraps(fn)
    def run(*a, **k):
        saved, torch.matmul = torch.matmul, mm
        try:
            return fn(*a, **k)
        finally:
            torch.matmul = saved
    return run


def _grads(args, weights, kw, dtype, bwd_mode=None, bwd_mm=None, fwd_mode="2 planes"):
    xs = [t.to(dtype) for t in args]
    ws = [w.to(dtype) for w in weights]
    k2 = dict(kw)
    for name in ("ln_weight", "ln_bias"):
        if k2[name] is not None:
            k2[name] = k2[name].to(dtype)
    o_bar = k2.pop("o_bar").to(dtype)
    if bwd_mode is None and bwd_mm is None:  # unpatched: float64 exact, or fp32's rounding
        r = chunk_vjp.sequence_vjp(*xs, ws, o_bar=o_bar, **k2)
    else:
        one = _patched(chunk_vjp.chunk_step_vjp, bwd_mm or _mm(bwd_mode))
        saved, torch.matmul = torch.matmul, _mm(fwd_mode)  # the forward's products
        try:
            r = chunk_vjp.sequence_vjp(*xs, ws, o_bar=o_bar, one_chunk_vjp=one, **k2)
        finally:
            torch.matmul = saved
    return [r[n].double() for n in NAMES[:6]] + [w.double() for w in r["weights"]]


TF32 = ("2 planes", "tf32 adjoints", "tf32 everywhere")
FP16 = ("2 planes", "fp16 adjoints", "fp16 everywhere")


def main(draws=6, groups=False, tf32=False, fp16=False):
    B, T, H, D, hidden, C = 2, 2 * 64 + 5, 2, 64, 256, 64
    modes = (GROUPS if groups else TF32 if tf32 else FP16 if fp16 else
             ("2 planes", "A one plane", "B one plane", "one plane"))
    group_of = _group_lines()
    worst = {m: 0.0 for m in modes}  # max over draws and gradients of err / bound
    for seed in range(draws):
        torch.manual_seed(seed)
        q, k, v, lr, forget, momentum = make_inputs(B, T, H, D, dtype=torch.float32)
        q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))  # bf16 inputs
        weights = make_weights(H, D, hidden, 2, dtype=torch.float32)
        ln = seed % 3 != 2
        kw = dict(chunk_size=C, activation=("gelu", "silu")[seed % 2], residual=seed % 4 < 2,
                  ln_weight=(1 + 0.2 * torch.randn(H, D)) if ln else None,
                  ln_bias=(0.2 * torch.randn(H, D)) if ln else None, ln_eps=1e-5,
                  read="token", initial_state=None, cu_seqlens=None,
                  o_bar=torch.randn(B, T, H, D))
        args = (q, k, v, lr, forget, momentum)
        g64 = _grads(args, weights, kw, torch.float64)
        g32 = _grads(args, weights, kw, torch.float32)
        bounds = [max(2e-2, 256 * rel_err(c, b)) for c, b in zip(g32, g64)]
        print(f"draw {seed} (LN {ln}, residual {kw['residual']}, {kw['activation']}): "
              "rel err per gradient " + " ".join(NAMES))
        print(f"  {'fp32 reference':14s} " + " ".join(f"{rel_err(c, b):.1e}"
                                                      for c, b in zip(g32, g64)))
        for m in modes:
            if groups:
                g = _grads(args, weights, kw, torch.float64, bwd_mm=_mm_group(m, group_of))
            elif m in TF32[1:] + FP16[1:]:
                kind = m.split()[0]
                g = _grads(args, weights, kw, torch.float64, kind,
                           fwd_mode=kind if m.endswith("everywhere") else "2 planes")
            else:
                g = _grads(args, weights, kw, torch.float64, m)
            errs = [rel_err(a, b) for a, b in zip(g, g64)]
            worst[m] = max(worst[m], max(e / bd for e, bd in zip(errs, bounds)))
            print(f"  {m:14s} " + " ".join(f"{e:.1e}" for e in errs))
    print("worst error / bound over the draws (bound: max(2e-2, 256 x fp32's); <= 1 passes)"
          + (", one plane in that group only:" if groups else ":"))
    for m in modes:
        print(f"  {m:14s} {worst[m]:.3f}")


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a not in ("--groups", "--tf32", "--fp16")]
    main(int(argv[0]) if argv else 6, groups="--groups" in sys.argv[1:],
         tf32="--tf32" in sys.argv[1:], fp16="--fp16" in sys.argv[1:])
