"""Where does an fp32 reference on the GPU lose accuracy against float64? Prints the matmul
precision settings and the error of the same computation on CPU fp32 and GPU fp32 (same inputs),
with and without TF32 explicitly off."""
import sys

import torch

sys.path.insert(0, "tests")
from conftest import make_inputs, make_weights, rel_err  # noqa: E402
from titans_cuda import neural_memory  # noqa: E402

print("allow_tf32", torch.backends.cuda.matmul.allow_tf32,
      "float32_matmul_precision", torch.get_float32_matmul_precision(),
      "fp32_precision", getattr(torch.backends.cuda.matmul, "fp32_precision", "n/a"),
      "cudnn.allow_tf32", torch.backends.cudnn.allow_tf32)
a = torch.randn(512, 512, dtype=torch.float64)
b = torch.randn(512, 512, dtype=torch.float64)
ref = a @ b
print("sgemm cpu", rel_err(a.float() @ b.float(), ref),
      "sgemm gpu", rel_err(a.float().cuda() @ b.float().cuda(), ref))
B, T, H, D, C = 2, 100, 4, 32, 16
for seed in range(3):
    torch.manual_seed(seed)
    args = list(make_inputs(B, T, H, D, dtype=torch.float32, lr_max=0.3))
    weights = make_weights(H, D, 64, 2, dtype=torch.float32)
    kw = dict(chunk_size=C, residual=True, read="token")
    o64, _ = neural_memory(*[x.double() for x in args], tuple(w.double() for w in weights), **kw)
    o_cpu, _ = neural_memory(*args, weights, **kw)
    o_gpu, _ = neural_memory(*[x.cuda() for x in args], tuple(w.cuda() for w in weights), **kw)
    print(f"seed {seed}: cpu fp32 {rel_err(o_cpu, o64):.2e}  gpu fp32 {rel_err(o_gpu, o64):.2e}")
