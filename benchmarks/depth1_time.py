"""Depth-1 neural_memory (M_W(x) = x + LN(x W), W: D x D) forward, and forward + backward, at
the benchmark shapes of registry.py (their D, chunk, dtype; no hidden layer): the kernels (the
chunked forward and the depth-1 fused backward), the kernels' forward with the reference's VJP
(what depth 1 took before its fused backward), and the reference. Back-to-back calls, CUDA
events after warm-up (splits._time_ms); peak memory of one forward + backward. Needs a GPU and
the built extension.

    python benchmarks/depth1_time.py                 # default short
    SHAPES="default" REF=0 python benchmarks/depth1_time.py   # without the reference's rows
    SPLITS="1 2 4" VJP=0 REF=0 python benchmarks/depth1_time.py   # forced clusters too
    ROWS="2,8192,8,128,32 8,2048,8,128,32" python benchmarks/depth1_time.py  # B,T,H,D,chunk rows
                                                                # instead of SHAPES
    DTYPE=float32 python benchmarks/depth1_time.py   # q, k, v dtype (default: the shape's, bf16)

SPLITS adds forward+backward at each forced cluster size of the backward (ops.FUSED_BWD_SPLIT:
1, 2 or 4 CTAs per (sequence, head)); VJP=0 leaves out the reference's-VJP row."""
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
        sys.exit("benchmarks/depth1_time.py needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}: neural_memory depth 1, ms (peak MiB of fwd+bwd)")
    if "ROWS" in os.environ:
        shapes = []
        for row in os.environ["ROWS"].split():
            B, T, H, D, C = (int(x) for x in row.split(","))
            shapes.append(dataclasses.replace(SHAPES["default"], name="row", B=B, T=T, H=H, D=D,
                                              hidden=D, chunk=C))
    else:
        shapes = [SHAPES[name] for name in os.environ.get("SHAPES", "default short").split()]
    if "DTYPE" in os.environ:
        shapes = [dataclasses.replace(s, dtype=os.environ["DTYPE"]) for s in shapes]
    for s in shapes:
        name = s.name
        ts = make_memory_inputs(s, dev, requires_grad=True, depth=1)
        q, k, v, lr, forget, momentum, w, gamma, beta = ts
        cot = torch.randn_like(q)

        def call(backend):
            o, _ = neural_memory(q, k, v, lr, forget, momentum, (w,), chunk_size=s.chunk,
                                 residual=True, ln_weight=gamma, ln_bias=beta, backend=backend)
            return o

        def fwd():
            with torch.no_grad():
                call("cuda")

        def fwd_bwd(backend="cuda"):
            torch.autograd.grad((call(backend) * cot).sum(), ts)

        fused = nm_ops.chunked_bwd_reason(q, [w], s.chunk, None, None, "token") is None
        row = [f"fwd {_time_ms(fwd, reps=5):.2f}",
               f"fwd+bwd {_time_ms(fwd_bwd, reps=5):.2f} ({peak(fwd_bwd):.0f})"]
        for split in os.environ.get("SPLITS", "").split():
            nm_ops.FUSED_BWD_SPLIT = int(split)
            try:
                row.append(f"split {split} {_time_ms(fwd_bwd, reps=5):.2f}")
            finally:
                nm_ops.FUSED_BWD_SPLIT = 0
        if os.environ.get("VJP", "1") != "0":
            # the kernels' forward with the reference's VJP: before the depth-1 backward
            row.append("fwd+ref-VJP {:.1f} ({:.0f})".format(*_with_reference_vjp(fwd_bwd)))
        if os.environ.get("REF", "1") != "0":
            ref = lambda: fwd_bwd("torch")  # noqa: E731
            row.append(f"reference fwd+bwd {_time_ms(ref, reps=2):.1f} ({peak(ref):.0f})")
        print(f"{name} B{s.B} T{s.T} H{s.H} D{s.D} C{s.chunk} {s.dtype} fused backward {fused}: "
              + ", ".join(row))


if __name__ == "__main__":
    main()
