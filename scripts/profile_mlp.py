"""One memory_grad forward + backward and one memory_forward forward + backward at the default
benchmark shape, for profilers (ncu / nsys): python scripts/profile_mlp.py"""
import torch

import titans_cuda

B, T, H, D, Dh, C = 2, 8192, 16, 64, 256, 64
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev, generator=g), dim=-1)
k = k.bfloat16().requires_grad_()
v = torch.randn(B, T, H, D, device=dev, generator=g).bfloat16().requires_grad_()
lr = (0.05 * torch.rand(B, T, H, device=dev, generator=g)).requires_grad_()
w = [(torch.randn(H, D, Dh, device=dev, generator=g) / D ** 0.5).requires_grad_(),
     (torch.randn(H, Dh, D, device=dev, generator=g) / Dh ** 0.5).requires_grad_()]
mem = dict(residual=True, ln_weight=torch.ones(H, D, device=dev),
           ln_bias=torch.zeros(H, D, device=dev), backend="cuda")
U = titans_cuda.memory_grad(k, v, lr, tuple(w), chunk_size=C, **mem)
torch.autograd.grad(U, [k, v, lr, *w], [torch.randn_like(u) for u in U])
y = titans_cuda.memory_forward(k, tuple(w), **mem)
torch.autograd.grad(y, [k, *w], torch.randn_like(y))
torch.cuda.synchronize()
print("ok")
