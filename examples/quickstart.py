"""A Titans memory layer in a few lines: write a sequence into the memory, read it back, then
stream the next tokens one at a time from the returned state, and pack sequences of different
lengths (runs on CPU or GPU; on a GPU the forward passes run the decode and chunked kernels)."""
import torch

import titans_cuda

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
B, T, H, D, hidden = 2, 512, 4, 64, 256

q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
k = k / k.norm(dim=-1, keepdim=True)          # unit keys keep the inner loop stable
lr = torch.full((B, T, H), 0.02, device=device)   # theta: inner learning rate, per token
forget = torch.full((B, T, H), 0.01, device=device)  # alpha: forgetting gate
momentum = torch.full((B, T, H), 0.9, device=device)  # eta: surprise decay
weights = (torch.randn(H, D, hidden, device=device) / D**0.5,   # learned initial memory,
           torch.randn(H, hidden, D, device=device) / hidden**0.5)  # a 2-layer MLP per head
ln_w, ln_b = torch.ones(H, D, device=device), torch.zeros(H, D, device=device)

o, state = titans_cuda.neural_memory(q, k, v, lr, forget, momentum, weights, chunk_size=64,
                                     residual=True, ln_weight=ln_w, ln_bias=ln_b,
                                     output_final_state=True)
print(f"read {tuple(o.shape)} {o.dtype}; state offset {state.offset.tolist()}")

# streaming decode: one token per call, exactly equal to one long call
step = [x[:, :1] for x in (q, k, v, lr, forget, momentum)]
o1, state = titans_cuda.neural_memory(*step, weights, chunk_size=64, residual=True,
                                      ln_weight=ln_w, ln_bias=ln_b, initial_state=state,
                                      output_final_state=True)
print(f"decode step {tuple(o1.shape)}; state offset now {state.offset.tolist()}")

# variable-length sequences packed FlashAttention-style: [1, total, H, D] and cu_seqlens
cu = torch.tensor([0, 300, 512], device=device)
packed = [x[:1].reshape(1, T, *x.shape[2:]) for x in (q, k, v, lr, forget, momentum)]
o_var, st_var = titans_cuda.neural_memory(*packed, weights, chunk_size=64, residual=True,
                                          ln_weight=ln_w, ln_bias=ln_b, cu_seqlens=cu,
                                          output_final_state=True)
print(f"packed {tuple(o_var.shape)}; one state per sequence, offsets {st_var.offset.tolist()}")

# gradients reach every input, the learned initial weights included
weights = tuple(w.requires_grad_(True) for w in weights)
o, _ = titans_cuda.neural_memory(q, k, v, lr, forget, momentum, weights, chunk_size=64,
                                 residual=True, ln_weight=ln_w, ln_bias=ln_b)
o.float().square().mean().backward()
print(f"grad of W1: {weights[0].grad.norm():.3e}")
for fn, what in titans_cuda.info()["kernels"].items():
    print(f"{fn:<15} {what}")
