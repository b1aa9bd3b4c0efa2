"""Forward time of the chunked neural_memory kernel for each cluster split it can be forced to
(CTAs per (sequence, head); docs/perf_notes.md, v5) and for the launcher's own choice, at the
benchmark shapes of registry.py (default, long, short) with benchmarks/run.py's inputs.

    python benchmarks/splits.py            # splits 1 2 3 4 6 8 and 0 (the launcher's)
    SPLITS="1 0" python benchmarks/splits.py

A split the kernel refuses prints "err". Needs a GPU and the built extension."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import SHAPES  # noqa: E402
from run import make_memory_inputs  # noqa: E402
from titans_cuda.ops.neural_memory import ops as nm_ops  # noqa: E402


def _time_ms(fn, reps=5):
    """Mean kernel time of back-to-back calls (CUDA events after 2 warm-ups). Unlike
    run.time_fn, which synchronises around every call and so also counts the host's work
    before the launch, this keeps the GPU queue full: the kernel alone."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _peak_mib(fn):
    """Peak memory fn() adds over what is allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _with_reference_vjp(fn, reps=2):
    """(ms, peak MiB) of fn() with the fused backward refused (chunked_bwd_reason patched): the
    kernels' forward with the reference's VJP, what the shapes without a fused backward take."""
    real = nm_ops.chunked_bwd_reason
    nm_ops.chunked_bwd_reason = lambda *a, **kw: "the reference's VJP (benchmark)"
    try:
        return _time_ms(fn, reps=reps), _peak_mib(fn)
    finally:
        nm_ops.chunked_bwd_reason = real


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/splits.py needs a CUDA GPU")
    splits = [int(x) for x in os.environ.get("SPLITS", "1 2 3 4 6 8 0").split()]
    print(f"# {torch.cuda.get_device_name()}: forward ms per split (0 = the launcher's choice)")
    for name in ("default", "long", "short"):
        s = SHAPES[name]
        q, k, v, lr, forget, momentum, w1, w2, gamma, beta = make_memory_inputs(
            s, torch.device("cuda"), requires_grad=False)
        args = (q, k, v, lr, forget, momentum, [w1, w2], gamma, beta, [], [], [], None, s.chunk,
                "silu", True, 1e-6, "token")
        row = []
        for split in splits:
            try:
                ms = _time_ms(lambda: nm_ops._launch(*args, split=split, kernel="chunked"))
                row.append(f"s{split}={ms:.2f}")
            except RuntimeError:
                row.append(f"s{split}=err")
        print(f"{name} B{s.B} T{s.T} H{s.H}: " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()
