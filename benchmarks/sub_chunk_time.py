"""The call chunks that run as sub-chunks (params.h, sub: chunk 128 at D = 64, chunks 64 and 128
at D = 128, depth 2) against the chunks below them, and against the path they took before
(the reference, where the forward did not fit either; else the forward kernel and the
reference's VJP): forward and forward + backward, ms (back-to-back calls, CUDA events after
warm-up), and the peak memory of one forward + backward. Needs a GPU and the built extension.

    python benchmarks/sub_chunk_time.py
    REF=0 python benchmarks/sub_chunk_time.py     # without the slow baselines
    READ=chunk python benchmarks/sub_chunk_time.py  # read "chunk" (default "token")"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import SHAPES  # noqa: E402
from run import make_memory_inputs  # noqa: E402
from splits import _peak_mib, _time_ms  # noqa: E402
from titans_cuda import neural_memory  # noqa: E402
from titans_cuda.ops.neural_memory import ops as nm_ops  # noqa: E402

CASES = [  # (D, H, hidden, chunks): the default shape's tokens, B = 2, T = 8192
    (64, 16, 256, (64, 128)),
    (128, 8, 512, (32, 64, 128)),
]


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/sub_chunk_time.py needs a CUDA GPU")
    ref = os.environ.get("REF", "1") != "0"
    read = os.environ.get("READ", "token")
    print(f"# {torch.cuda.get_device_name()}: neural_memory, bf16, depth 2, LayerNorm + "
          f"residual, read {read!r}, ms")
    for D, H, hidden, chunks in CASES:
        for C in chunks:
            s = replace(SHAPES["default"], D=D, H=H, hidden=hidden, chunk=C)
            q, k, v, lr, fg, mo, w1, w2, gamma, beta = make_memory_inputs(
                s, torch.device("cuda"), requires_grad=True)
            fwd_ck, fwd_r = nm_ops.fwd_chunking(D, 2, C)
            bwd_ck, bwd_r = nm_ops.bwd_chunking(D, C)

            def call(backend, backward):
                o, _ = neural_memory(q, k, v, lr, fg, mo, (w1, w2), chunk_size=C,
                                     residual=True, ln_weight=gamma, ln_bias=beta,
                                     read=read, backend=backend)
                if backward:
                    o.float().square().mean().backward()
                    for t in (q, k, v, lr, fg, mo, w1, w2, gamma, beta):
                        t.grad = None

            line = (f"D{D} H{H} hidden {hidden} C{C} (forward {fwd_r} x {fwd_ck}, backward "
                    f"{bwd_r} x {bwd_ck}): fused fwd {_time_ms(lambda: call('cuda', False)):.2f}"
                    f", fwd+bwd {_time_ms(lambda: call('cuda', True)):.2f} "
                    f"({_peak_mib(lambda: call('cuda', True)):.0f} MiB)")
            if ref and (fwd_r > 1 or bwd_r > 1):
                line += f"; reference fwd+bwd {_time_ms(lambda: call('torch', True), reps=1):.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
