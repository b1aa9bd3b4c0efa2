"""Forward time of the chunked neural_memory kernel for each cluster split it can be forced to
(CTAs per (sequence, head); docs/perf_notes.md, v5) and for the launcher's own choice, at the
three benchmark shapes (H = 16, D = 64, hidden 256, C = 64, bf16, residual + LayerNorm).

    python benchmarks/splits.py            # splits 1 2 3 4 6 8 and 0 (the launcher's)
    SPLITS="1 0" python benchmarks/splits.py

CUDA events over 5 calls after 2 warm-ups; a split the kernel refuses prints "err". Needs a GPU
and the built extension."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import make_inputs, make_weights  # noqa: E402
from titans_cuda.ops.neural_memory import ops as nm_ops  # noqa: E402


def _time_ms(fn, reps=5):
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


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/splits.py needs a CUDA GPU")
    splits = [int(x) for x in os.environ.get("SPLITS", "1 2 3 4 6 8 0").split()]
    H, D = 16, 64
    print(f"# {torch.cuda.get_device_name()}: forward ms per split (0 = the launcher's choice)")
    for B, T in ((2, 8192), (1, 32768), (8, 2048)):
        q, k, v, lr, forget, momentum = make_inputs(B, T, H, D, dtype=torch.float32,
                                                    device="cuda")
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        weights = list(make_weights(H, D, 4 * D, 2, dtype=torch.float32, device="cuda"))
        ln_weight = 1 + 0.2 * torch.randn(H, D, device="cuda")
        args = (q, k, v, lr, forget, momentum, weights, ln_weight, None, [], [], [], None, 64,
                "silu", True, 1e-6, "token")
        row = []
        for split in splits:
            try:
                ms = _time_ms(lambda: nm_ops._launch(*args, split=split, kernel="chunked"))
                row.append(f"s{split}={ms:.2f}")
            except RuntimeError:
                row.append(f"s{split}=err")
        print(f"B{B} T{T}: " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()
