"""neural_memory at D = 128 (depth 2, residual + LayerNorm with bias, bf16, read "token"):
forward, and forward + backward with the fused backward (chunk 16 or 32), against what D = 128
took before it (the kernels' forward with the reference's VJP) and, at chunk 64, the kernels'
forward with the reference's VJP (no fused backward there). Back-to-back calls, CUDA events
after warm-up (splits._time_ms); peak memory of one forward + backward. Needs a GPU and the
built extension.

    python benchmarks/d128_time.py                       # B2 T8192 H8 and B8 T2048 H8
    ROWS="2,8192,8,256,32" python benchmarks/d128_time.py   # B,T,H,hidden,chunk rows"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import SHAPES  # noqa: E402
from run import make_memory_inputs  # noqa: E402
from splits import _peak_mib as peak, _time_ms, _with_reference_vjp  # noqa: E402
from titans_cuda import neural_memory  # noqa: E402
from titans_cuda.ops.neural_memory import ops as nm_ops  # noqa: E402


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/d128_time.py needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}: neural_memory D 128, ms (peak MiB of fwd+bwd)")
    rows = os.environ.get("ROWS", "2,8192,8,256,32 2,8192,8,512,32 8,2048,8,256,32 "
                                  "8,2048,8,256,16").split()
    for row in rows:
        B, T, H, hid, C = (int(x) for x in row.split(","))
        s = dataclasses.replace(SHAPES["default"], B=B, T=T, H=H, D=128, hidden=hid, chunk=C)
        ts = make_memory_inputs(s, dev, requires_grad=True)
        q, k, v, lr, forget, momentum, w1, w2, gamma, beta = ts
        cot = torch.randn_like(q)

        def call():
            o, _ = neural_memory(q, k, v, lr, forget, momentum, (w1, w2), chunk_size=C,
                                 residual=True, ln_weight=gamma, ln_bias=beta, backend="cuda")
            return o

        def fwd():
            with torch.no_grad():
                call()

        def fwd_bwd():
            torch.autograd.grad((call() * cot).sum(), ts)

        fused = nm_ops.chunked_bwd_reason(q, [w1, w2], C, None, None, "token") is None
        out = [f"fwd {_time_ms(fwd, reps=5):.2f}",
               f"fwd+bwd {_time_ms(fwd_bwd, reps=5):.2f} ({peak(fwd_bwd):.0f})"]
        # the kernels' forward with the reference's VJP: what D = 128 took before
        out.append("fwd+ref-VJP {:.1f} ({:.0f})".format(*_with_reference_vjp(fwd_bwd)))
        print(f"B{B} T{T} H{H} D128 hidden {hid} C{C} fused backward {fused}: " + ", ".join(out),
              flush=True)


if __name__ == "__main__":
    main()
