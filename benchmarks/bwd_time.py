"""Forward, and forward + backward, of neural_memory through the kernels (fused forward, and
the fused backward where chunked_bwd_reason allows) at the benchmark shapes of registry.py,
with CUDA events after warm-up, and the peak memory of one forward + backward. Prints a line
per shape. Needs a GPU and the built extension.

    python benchmarks/bwd_time.py             # default long short
    SHAPES="default" python benchmarks/bwd_time.py
    BWD_SPLITS="0 1 4" python benchmarks/bwd_time.py   # the backward at forced cluster splits
                                                        # (0: the launcher's choice)
    BWD_K=4 python benchmarks/bwd_time.py      # checkpoints every 4 chunks (default: the
                                                # library's FUSED_BWD_CHECKPOINT_EVERY)
    READ=chunk python benchmarks/bwd_time.py   # read "chunk" (default "token")
    ONCE=1 SHAPES=default ncu -k regex:bwd_kernel python benchmarks/bwd_time.py  # one step"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import SHAPES  # noqa: E402
from run import make_memory_inputs  # noqa: E402
from splits import _time_ms  # noqa: E402  (back-to-back calls, CUDA events after warm-up)
from titans_cuda import _lib, neural_memory  # noqa: E402
from titans_cuda.ops.neural_memory import ops as nm_ops  # noqa: E402


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/bwd_time.py needs a CUDA GPU")
    if "BWD_K" in os.environ:
        nm_ops.FUSED_BWD_CHECKPOINT_EVERY = int(os.environ["BWD_K"])
    print(f"# {torch.cuda.get_device_name()}: neural_memory backend='cuda', ms, checkpoints "
          f"every {nm_ops.FUSED_BWD_CHECKPOINT_EVERY} chunks")
    for name in os.environ.get("SHAPES", "default long short").split():
        s = SHAPES[name]
        t = make_memory_inputs(s, torch.device("cuda"), requires_grad=True)
        q, k, v, lr, forget, momentum, w1, w2, gamma, beta = t
        read = os.environ.get("READ", "token")
        kw = dict(chunk_size=s.chunk, activation="silu", residual=True, ln_weight=gamma,
                  ln_bias=beta, read=read, backend="cuda")
        fused = nm_ops.chunked_bwd_reason(q, [w1, w2], s.chunk, None, None, read) is None
        cot = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                neural_memory(q, k, v, lr, forget, momentum, (w1, w2), **kw)

        def fwd_bwd():
            o = neural_memory(q, k, v, lr, forget, momentum, (w1, w2), **kw)
            o = o[0] if isinstance(o, tuple) else o
            torch.autograd.grad((o * cot).sum(), t)
        if os.environ.get("ONCE"):  # one forward + backward, for a profiler (ncu -k bwd_kernel)
            fwd_bwd()
            torch.cuda.synchronize()
            continue
        f_ms = _time_ms(fwd, reps=3)
        for split in [int(x) for x in os.environ.get("BWD_SPLITS", "0").split()]:
            nm_ops.FUSED_BWD_SPLIT = split
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fb_ms = _time_ms(fwd_bwd, reps=3)
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            taken = _lib._C.neural_memory_chunked_bwd_plan(
                n_seq=s.B, heads=s.H, dim=s.D, hidden=w1.shape[-1], chunk=s.chunk,
                dtype=nm_ops.KERNEL_DTYPES.index(q.dtype), split=split,
                device=torch.cuda.current_device()) if fused else None
            print(f"{name} B{s.B} T{s.T} H{s.H} read {read}: fwd {f_ms:.2f} fwd+bwd {fb_ms:.2f} "
                  f"(fused backward: {fused}, split {split} -> {taken}) peak {peak:.0f} MiB",
                  flush=True)
        nm_ops.FUSED_BWD_SPLIT = 0


if __name__ == "__main__":
    main()
