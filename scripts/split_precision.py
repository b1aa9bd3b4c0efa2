"""How many bf16 planes does the chunked kernel need for fp32 inputs? A CPU emulation.

Runs the neural_memory reference in float64 with every matrix product replaced by what the
kernel computes: both operands rounded to fp32 (the kernel's fp32 values), split into bf16
planes x = x1 + x2 (+ x3), the plane products that the kernel issues summed exactly (a bf16 x
bf16 product is exact in the mma's fp32 accumulator), and the result rounded to fp32. Two
planes (hi*hi + hi*lo + lo*hi) is the kernel today (about 17 significant bits); three planes
adds h*l + l*h + m*m (six products, fp32 quality). Elementwise work stays float64, so this
isolates the products. Prints the error of o and of the final state against the float64
reference, next to the fp32 reference's own error, over draws with LayerNorm.

    python scripts/split_precision.py [draws]
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, "tests")
from conftest import make_inputs, make_weights, rel_err  # noqa: E402
from titans_cuda.ops.neural_memory import reference as ref  # noqa: E402

_matmul = torch.matmul


def _planes(x, n):
    x = x.to(torch.float32).to(torch.float64)
    out = []
    for _ in range(n):
        p = x.to(torch.bfloat16).to(torch.float64)
        out.append(p)
        x = x - p
    return out


def _split_matmul(n):
    # plane products the kernel issues: i + j < n (two planes: 0*0, 0*1, 1*0)
    def mm(a, b):
        pa, pb = _planes(a, n), _planes(b, n)
        acc = sum(_matmul(pa[i], pb[j]) for i in range(n) for j in range(n) if i + j < n)
        return acc.to(torch.float32).to(torch.float64)
    return mm


def _run(args, weights, kw, dtype, planes=None):
    torch.matmul = _split_matmul(planes) if planes else _matmul
    try:
        o, st = ref.neural_memory(*(t.to(dtype) for t in args),
                                  tuple(w.to(dtype) for w in weights), output_final_state=True,
                                  **kw)
    finally:
        torch.matmul = _matmul
    return o.double(), [t.double() for t in (*st.weights, *st.momentum)]


def main(draws=8):
    B, T, H, D, hidden, C = 2, 67, 2, 64, 256, 64
    rows = {"fp32 reference": [], "2 planes (kernel)": [], "3 planes": []}
    for seed in range(draws):
        torch.manual_seed(seed)
        args = make_inputs(B, T, H, D, dtype=torch.float32)
        weights = make_weights(H, D, hidden, 2, dtype=torch.float32)
        kw = dict(chunk_size=C, activation="gelu", residual=bool(seed % 2),
                  ln_weight=1 + 0.2 * torch.randn(H, D), ln_bias=0.2 * torch.randn(H, D))
        o64, s64 = _run(args, weights, kw, torch.float64)
        for name, dtype, planes in (("fp32 reference", torch.float32, None),
                                    ("2 planes (kernel)", torch.float64, 2),
                                    ("3 planes", torch.float64, 3)):
            o, s = _run(args, weights, kw, dtype, planes)
            rows[name].append(max([rel_err(o, o64)] + [rel_err(a, b) for a, b in zip(s, s64)]))
    print(f"max over o and the state vs float64, {draws} draws (D={D}, hidden {hidden}, C={C}, "
          f"T={T}, gelu, LayerNorm with random gain and bias); SPEC fp32 bound 1e-5")
    for name, errs in rows.items():
        errs = torch.tensor(errs)
        print(f"  {name:18s} max {errs.max():.2e}  median {errs.median():.2e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
