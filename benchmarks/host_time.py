"""Host time of short neural_memory calls, the cost that dominates them (docs/perf_notes.md
v18): a training call's forward, loss and backward timed on the host after a synchronisation
(medians), the same call back to back (the GPU queue kept full: what a training loop sees), a
forward without grad, and one streaming-decode token on a state. Needs a GPU and the built
extension. TITANS_EAGER_DIRECT=0 times the registered ops' path instead of the direct one.

    python benchmarks/host_time.py                # T = 256 and 1024, decode at B = 4
    TS="256" DECODE_B=8 python benchmarks/host_time.py
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import SHAPES  # noqa: E402
from run import make_memory_inputs  # noqa: E402
from splits import _time_ms  # noqa: E402

from titans_cuda import neural_memory  # noqa: E402


def _back_to_back_ms(fn, reps=20, rounds=3):
    """The best of ``rounds`` back-to-back means (splits._time_ms: the GPU queue kept full)."""
    return min(_time_ms(fn, reps) for _ in range(rounds))


def training_call(T: int, B: int = 1):
    """Host ms per phase of a forward+backward at the default layer (B x T, H = 16)."""
    s = dataclasses.replace(SHAPES["short"], B=B, T=T)
    leaves = make_memory_inputs(s, torch.device("cuda"), requires_grad=True)
    q, k, v, lr, forget, momentum, w1, w2, gamma, beta = leaves
    kw = dict(chunk_size=s.chunk, activation="silu", residual=True, ln_weight=gamma,
              ln_bias=beta, read="token", backend="cuda")
    cot = torch.randn_like(q)
    phases = {"forward": [], "loss": [], "backward": [], "total": []}
    for i in range(60):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o, _ = neural_memory(q, k, v, lr, forget, momentum, (w1, w2), **kw)
        t1 = time.perf_counter()
        loss = (o * cot).sum()
        t2 = time.perf_counter()
        torch.autograd.grad(loss, leaves)
        t3 = time.perf_counter()
        if i >= 10:
            for name, d in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[name].append(d * 1e3)

    def fwd_bwd():
        o, _ = neural_memory(q, k, v, lr, forget, momentum, (w1, w2), **kw)
        torch.autograd.grad((o * cot).sum(), leaves)

    def fwd():
        with torch.no_grad():
            neural_memory(q, k, v, lr, forget, momentum, (w1, w2), **kw)
    med = {name: statistics.median(ts) for name, ts in phases.items()}
    return med, _back_to_back_ms(fwd_bwd), _back_to_back_ms(fwd)


def decode_token(B: int, H: int = 16, D: int = 64, hidden: int = 256):
    """(host ms per token, back-to-back ms per token) of T = 1 calls on a state, no grad."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g)
    w = (rand(H, D, hidden) / D ** 0.5, rand(H, hidden, D) / hidden ** 0.5)
    q, k, v = (rand(B, 1, H, D).bfloat16() for _ in range(3))
    lr, forget = (0.05 * torch.rand(B, 1, H, device="cuda") for _ in range(2))
    momentum = torch.full((B, 1, H), 0.9, device="cuda")
    kw = dict(chunk_size=64, activation="silu", residual=True, backend="cuda",
              output_final_state=True)
    box = []
    with torch.no_grad():
        box.append(neural_memory(q, k, v, lr, forget, momentum, w, **kw)[1])

        def step():
            box[0] = neural_memory(q, k, v, lr, forget, momentum, w, initial_state=box[0],
                                   **kw)[1]
        for _ in range(10):
            step()
        host = []
        for _ in range(200):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(host), _back_to_back_ms(step, reps=200, rounds=1)


def main():
    direct = os.environ.get("TITANS_EAGER_DIRECT", "1") != "0"
    print(f"{torch.cuda.get_device_name()}, eager path: {'direct' if direct else 'the ops'}")
    for T in (int(t) for t in os.environ.get("TS", "256 1024").split()):
        med, fb, f = training_call(T)
        print(f"B1 T{T} H16 host ms (median): " + ", ".join(f"{n} {v:.3f}" for n, v in med.items())
              + f" | back to back: fwd+bwd {fb:.3f}, fwd without grad {f:.3f}", flush=True)
    B = int(os.environ.get("DECODE_B", 4))
    host, b2b = decode_token(B)
    print(f"decode B{B} T1 H16 (a state in and out, no grad): host per token {host:.3f} ms, "
          f"back to back {b2b:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
