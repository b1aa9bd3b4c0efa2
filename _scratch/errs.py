import sys, os, torch
sys.path.insert(0, "tests")
import test_gpu_chunked_bwd as T
from conftest import rel_err
from titans_cuda.ops.neural_memory import ops as nm_ops
torch.manual_seed(0)
for dc in ((32, 16), (64, 32), (64, 64)):
    for hi, head in ((1, T.HEADS[1]), (2, T.HEADS[2])):
        for kind in ("long", "fresh"):
            d, c = dc
            torch.manual_seed(1)
            args, weights, st, mem, cu = T._case((128, torch.bfloat16, kind, head, "gelu"), C=c, D=d)
            g64 = T._grads(args, weights, st, mem, cu, "torch", torch.float64)
            g32 = T._grads(args, weights, st, mem, cu, "torch", torch.float32)
            for K in (1, 3):
                for split in (1, 2, -3):
                    nm_ops.FUSED_BWD_CHECKPOINT_EVERY = K
                    nm_ops.FUSED_BWD_SPLIT = split
                    g = T._grads(args, weights, st, mem, cu, "cuda")
                    worst = []
                    for i, (a, b, f) in enumerate(zip(g, g64, g32)):
                        if b is None or not b.any():
                            continue
                        e, e32 = rel_err(a, b), rel_err(f, b)
                        worst.append((e / max(2e-2, 256 * e32), i, e, e32))
                    w = max(worst)
                    print(f"D{d} C{c} heads{hi} {kind} K{K} split{split}: worst ratio {w[0]:.2f} leaf {w[1]} err {w[2]:.2e} f32err {w[3]:.2e}", flush=True)
