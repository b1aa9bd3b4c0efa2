import sys, torch
sys.path.insert(0, "benchmarks")
from registry import SHAPES
import run as R
dev = torch.device("cuda")
for name in sys.argv[1:] or ["default"]:
    s = SHAPES[name]
    for label, make, bwd in [("fused fwd", R.bench_fused, False), ("sdpa fwd", R.bench_sdpa, False),
                             ("sdpa fwd+bwd", R.bench_sdpa, True), ("parallel fwd", R.bench_parallel, False)]:
        ms, peak = R.time_fn(make(s, dev, bwd), dev, budget_s=1.0)
        print(f"{name:8s} {label:14s} {ms:8.3f} ms  peak {peak/2**20:8.1f} MiB", flush=True)
