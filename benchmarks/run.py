"""Benchmark table, JSON and plot: our reference and kernels against causal SDPA (flash) and
titans-pytorch's NeuralMemory on the same shapes (forward and forward+backward, CUDA events,
warm-up, median; tokens/s and peak memory).

    python benchmarks/run.py                      # default shape + sweep plot, on a GPU
    python benchmarks/run.py --shape long --no-sweep
    python benchmarks/run.py --memory --shape default long short   # issue 4's table, one run
    python benchmarks/run.py --out results/       # writes bench.json and bench.png there

On a machine without a GPU it says so and times a tiny CPU shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402
from registry import SHAPES, SWEEP_T, Shape  # noqa: E402

import titans_cuda  # noqa: E402
from titans_cuda import memory_scan, neural_memory, parallel_neural_memory  # noqa: E402

HBM_BYTES_PER_S = 3.0e12   # device-to-device copy measured on our H100 (KERNEL_NOTES)
PEAK_FLOPS = 798e12        # bf16 dense matmul measured on our H100


def _progress(items, desc):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return items


def time_fn(fn, device, budget_s=2.0, min_reps=3, max_reps=50):
    """Median time in ms of fn() (CUDA events after warm-up), and the peak memory it added."""
    fn()  # warm-up (allocator, autotuning, lazy init)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = start.elapsed_time(end)
        reps = int(max(min_reps, min(max_reps, budget_s * 1e3 / max(est, 1e-3))))
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return statistics.median(times), peak
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def make_memory_inputs(s: Shape, device, requires_grad, depth: int = 2):
    """q, k, v, lr, forget, momentum, the weights (depth 2: [H, D, hidden], [H, hidden, D];
    depth 1: one [H, D, D]), LayerNorm gamma, beta."""
    dtype = getattr(torch, s.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(device=device, generator=g)
    q = torch.randn(s.B, s.T, s.H, s.D, **kw).to(dtype)
    k = torch.randn(s.B, s.T, s.H, s.D, **kw)
    k = (k / k.norm(dim=-1, keepdim=True)).to(dtype)
    v = torch.randn(s.B, s.T, s.H, s.D, **kw).to(dtype)
    lr = 0.05 * torch.rand(s.B, s.T, s.H, **kw)
    forget = 0.05 * torch.rand(s.B, s.T, s.H, **kw)
    momentum = 0.5 + 0.45 * torch.rand(s.B, s.T, s.H, **kw)
    weights = ((torch.randn(s.H, s.D, s.hidden, **kw) / s.D ** 0.5,
                torch.randn(s.H, s.hidden, s.D, **kw) / s.hidden ** 0.5) if depth == 2 else
               (torch.randn(s.H, s.D, s.D, **kw) / s.D ** 0.5,))
    gamma = torch.ones(s.H, s.D, device=device)
    beta = torch.zeros(s.H, s.D, device=device)
    tensors = [q, k, v, lr, forget, momentum, *weights, gamma, beta]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def bench_reference(s: Shape, device, backward, backend="torch"):
    """neural_memory: the reference, or (backend="cuda") the fused kernels (the chunked forward;
    the fused backward where chunked_bwd_reason allows, at every benchmark shape)."""
    q, k, v, lr, fg, mo, w1, w2, gamma, beta = make_memory_inputs(s, device, backward)

    def run():
        o, _ = neural_memory(q, k, v, lr, fg, mo, (w1, w2), chunk_size=s.chunk, residual=True,
                             ln_weight=gamma, ln_bias=beta, backend=backend)
        if backward:
            o.float().sum().backward()
    return run


def bench_fused(s: Shape, device, backward):
    return bench_reference(s, device, backward, backend="cuda")


def bench_parallel(s: Shape, device, backward):
    """Our fully parallel variant (the same math as titans-pytorch's default)."""
    q, k, v, lr, _, _, w1, w2, gamma, beta = make_memory_inputs(s, device, backward)
    n_chunks = -(-s.T // s.chunk)
    g = torch.Generator(device=device).manual_seed(2)
    forget = (0.05 * torch.rand(s.B, n_chunks, s.H, device=device, generator=g))
    momentum = (0.5 + 0.45 * torch.rand(s.B, n_chunks, s.H, device=device, generator=g))
    if backward:
        forget.requires_grad_(True)
        momentum.requires_grad_(True)

    def run():
        o = parallel_neural_memory(q, k, v, lr, forget, momentum, (w1, w2), chunk_size=s.chunk,
                                   residual=True, ln_weight=gamma, ln_bias=beta)
        if backward:
            o.float().sum().backward()
    return run


def bench_sdpa(s: Shape, device, backward):
    dtype = getattr(torch, s.dtype)
    q, k, v = (torch.randn(s.B, s.H, s.T, s.D, device=device, dtype=dtype,
                           requires_grad=backward) for _ in range(3))

    def run():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            o.float().sum().backward()
    return run


def bench_titans_pytorch(s: Shape, device, backward):
    from titans_pytorch import NeuralMemory  # noqa: raises ImportError when absent
    dtype = getattr(torch, s.dtype)
    mem = NeuralMemory(dim=s.H * s.D, chunk_size=s.chunk, heads=s.H, dim_head=s.D,
                       default_model_kwargs=dict(depth=2, expansion_factor=s.hidden / s.D))
    mem = mem.to(device=device, dtype=dtype)
    x = torch.randn(s.B, s.T, s.H * s.D, device=device, dtype=dtype, requires_grad=backward)

    def run():
        o, _ = mem(x)
        if backward:
            o.float().sum().backward()
    return run


def bench_scan(s: Shape, device, backward, backend, backward_only=False):
    n_chunks = -(-s.T // s.chunk)
    g = torch.Generator(device=device).manual_seed(1)
    kw = dict(device=device, generator=g)
    U = (0.01 * torch.randn(s.B, s.H, n_chunks, s.D, s.hidden, **kw),
         0.01 * torch.randn(s.B, s.H, n_chunks, s.hidden, s.D, **kw))
    alpha = 0.05 * torch.rand(s.B, n_chunks, s.H, **kw)
    eta = 0.9 * torch.rand(s.B, n_chunks, s.H, **kw)
    W0 = (torch.randn(s.H, s.D, s.hidden, **kw), torch.randn(s.H, s.hidden, s.D, **kw))
    leaves = (*U, alpha, eta, *W0)
    if backward:
        for t in leaves:
            t.requires_grad_(True)

    def forward():
        return memory_scan(U, alpha, eta, initial_weights=W0, backend=backend)
    if backward_only:
        w_all, s_last = forward()
        outs = w_all + s_last
        cot = [torch.randn_like(o) for o in outs]
        return lambda: torch.autograd.grad(outs, leaves, cot, retain_graph=True)

    def run():
        w_all, s_last = forward()
        if backward:
            (sum(w.sum() for w in w_all) + sum(x.sum() for x in s_last)).backward()
    return run


def bench_mlp(s: Shape, device, block, layout, backward_only, backend="cuda"):
    """memory_forward / memory_grad alone at the shape, with residual + LN + bias (the default
    layer). layout "shared" ([H, ...] weights) or "chunk" (per-chunk weights, as the parallel
    variant's reads are). backward_only times the VJP of a recorded forward."""
    q, k, v, lr, _, _, w1, w2, gamma, beta = make_memory_inputs(s, device, False)
    n_chunks = -(-s.T // s.chunk)
    if layout == "chunk":
        g = torch.Generator(device=device).manual_seed(3)
        w1 = w1.unsqueeze(1) + 0.01 * torch.randn(s.B, s.H, n_chunks, s.D, s.hidden,
                                                  device=device, generator=g)
        w2 = w2.unsqueeze(1) + 0.01 * torch.randn(s.B, s.H, n_chunks, s.hidden, s.D,
                                                  device=device, generator=g)
    leaves = [q, w1, w2, gamma, beta] if block == "memory_forward" else \
        [k, v, lr, w1, w2, gamma, beta]
    if backward_only:
        for t in leaves:
            t.requires_grad_(True)
    mem = dict(residual=True, ln_weight=gamma, ln_bias=beta, backend=backend)

    def forward():
        if block == "memory_forward":
            return (titans_cuda.memory_forward(q, (w1, w2), chunk_size=s.chunk, **mem),)
        return titans_cuda.memory_grad(k, v, lr, (w1, w2), chunk_size=s.chunk, **mem)
    if not backward_only:
        return forward
    outs = forward()
    cot = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, leaves, cot, retain_graph=True)


def mlp_counts(s: Shape, block, layout, backward_only):
    """(FLOPs, bytes) floors of a block at the shape: useful FLOPs (a backward counts 2x its
    forward), and the bytes every implementation must move (activations in the shape's dtype,
    fp32 weights, updates and weight gradients; what a kernel re-reads or writes as per-tile
    partials beyond that is its own overhead)."""
    n = s.B * s.T * s.H
    n_chunks = -(-s.T // s.chunk)
    E = 2 * s.D * s.hidden
    w_bytes = 4 * E * (s.B * s.H * n_chunks if layout == "chunk" else s.H)
    act = torch.finfo(getattr(torch, s.dtype)).bits // 8 * n * s.D  # one [B, T, H, D] tensor
    u_bytes = 4 * E * s.B * s.H * n_chunks
    if block == "memory_forward":
        fl = flops.memory_forward(s.D, s.hidden) * n
        return (2 * fl, 3 * act + 2 * w_bytes) if backward_only else (fl, 2 * act + w_bytes)
    fl = flops.memory_grad(s.D, s.hidden) * n
    if backward_only:  # read k, v, lr, W, dU; write dk, dv, dlr, dW
        return 2 * fl, 4 * act + 8 * n + 2 * w_bytes + u_bytes
    return fl, 2 * act + 4 * n + w_bytes + u_bytes


def scan_bytes(s: Shape, backward_only=False) -> int:
    """Fewest bytes the scan must move (fp32). Forward: read every U_j, write every W_j, plus
    W_0 and S_last once. Backward: read dL/dW_j, W_{j-1} and U_j (to recompute S_{j-1}), write
    dU_j, plus the per-head state once."""
    n_chunks = -(-s.T // s.chunk)
    E = 2 * s.D * s.hidden
    per_chunk = 4 if backward_only else 2
    return 4 * E * s.B * s.H * (per_chunk * n_chunks + 2)


def _forward_flops(method, s: Shape):
    """Forward FLOPs per token and head of a method (None where no count applies)."""
    if method in ("reference", "fused (ours)"):
        return flops.neural_memory_forward(s.D, s.hidden, s.chunk)
    if method in ("parallel (ours)", "titans-pytorch"):
        return flops.parallel_neural_memory_forward(s.D, s.hidden, s.chunk)
    if method == "sdpa-causal":
        return flops.sdpa_causal_forward(s.T, s.D)
    return None


def _pass_name(bwd, extra):
    if extra == "scan-bwd" or (isinstance(extra, tuple) and bwd):
        return "bwd"
    return "fwd+bwd" if bwd else "fwd"


def run_shape(s: Shape, device, methods, rows, progress_desc):
    for name, make, bwd, extra in _progress(methods, progress_desc):
        try:
            ms, peak = time_fn(make(s, device, bwd), device)
        except ImportError as exc:
            rows.append(dict(shape=s.name, method=name, pass_=_pass_name(bwd, extra),
                             error=f"not installed: {exc}"))
            continue
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(dict(shape=s.name, method=name, pass_=_pass_name(bwd, extra),
                             error="out of memory"))
            continue
        row = dict(shape=s.name, B=s.B, T=s.T, H=s.H, D=s.D, hidden=s.hidden, chunk=s.chunk,
                   dtype=s.dtype, method=name, pass_=_pass_name(bwd, extra), ms=ms,
                   tokens_per_s=s.B * s.T / (ms / 1e3),
                   peak_mib=None if peak is None else peak / 2**20)
        fwd_flops = _forward_flops(name, s)
        if fwd_flops is not None:
            # forward+backward counted as 3x forward (two matmuls back per matmul forward)
            total = fwd_flops * s.B * s.T * s.H * (3 if bwd else 1)
            row["tflops"] = total / (ms / 1e3) / 1e12
        if isinstance(extra, tuple) and device.type == "cuda":  # ("mlp", block, layout)
            fl, nbytes = mlp_counts(s, extra[1], extra[2], bwd)
            sec = ms / 1e3
            row["tflops"] = fl / sec / 1e12
            row["gb_per_s"] = nbytes / sec / 1e9
            row["roofline_fraction"] = max(fl / PEAK_FLOPS, nbytes / HBM_BYTES_PER_S) / sec
            row["bound"] = "flops" if fl / PEAK_FLOPS > nbytes / HBM_BYTES_PER_S else "bytes"
        if extra in ("scan", "scan-bwd") and device.type == "cuda" and (
                not bwd or extra == "scan-bwd"):
            nbytes = scan_bytes(s, backward_only=extra == "scan-bwd")
            row["gb_per_s"] = nbytes / (ms / 1e3) / 1e9
            row["roofline_fraction"] = (nbytes / HBM_BYTES_PER_S) / (ms / 1e3)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def methods_for(device, include_titans=True):
    m = [("reference", bench_reference, False, None), ("reference", bench_reference, True, None),
         ("parallel (ours)", bench_parallel, False, None),
         ("parallel (ours)", bench_parallel, True, None)]
    if titans_cuda._lib.kernels_unavailable_reason(device) is None:
        m += [("fused (ours)", bench_fused, False, None), ("fused (ours)", bench_fused, True, None)]
    if device.type == "cuda":
        m += [("sdpa-causal", bench_sdpa, False, None), ("sdpa-causal", bench_sdpa, True, None)]
        if include_titans:
            m += [("titans-pytorch", bench_titans_pytorch, False, None),
                  ("titans-pytorch", bench_titans_pytorch, True, None)]
    return m


def scan_methods(device):
    m = [("memory_scan ref", lambda s, d, b: bench_scan(s, d, b, "torch"), False, "scan"),
         ("memory_scan ref", lambda s, d, b: bench_scan(s, d, b, "torch"), True, "scan")]
    if titans_cuda._lib.kernels_unavailable_reason(device) is None:
        m += [("memory_scan kernel", lambda s, d, b: bench_scan(s, d, b, "cuda"), False, "scan"),
              ("memory_scan kernel", lambda s, d, b: bench_scan(s, d, b, "cuda"), True, "scan"),
              ("memory_scan kernel", lambda s, d, b: bench_scan(s, d, b, "cuda", True), True,
               "scan-bwd")]
    return m


DECODE_BATCHES = (2, 8, 64)
DECODE_GRAPH_STEPS = 10  # steps per graph replay (one replay's launch gap spread over them)


def decode_bytes(s: Shape) -> int:
    """Bytes a decode step must move: read the state (W, S, the open chunk's weights) and write
    the new one, fp32; q, k, v and o are negligible."""
    return 6 * 4 * 2 * s.D * s.hidden * s.B * s.H


def bench_decode(s: Shape, device, mode):
    """One-token neural_memory calls on a state (T = 1, depth 2, residual + LN, read "token").
    mode "graph": DECODE_GRAPH_STEPS decode ops captured in a CUDA graph and replayed (the
    kernel's time, as a serving loop would run it); "split<n>": the same with n CTAs per
    (sequence, head) forced; "eager": the public call with its argument checks; "reference":
    the same call on the PyTorch reference."""
    from titans_cuda import MemoryState
    from titans_cuda.ops.neural_memory import ops as nm_ops
    q, k, v, lr, fg, mo, w1, w2, gamma, beta = make_memory_inputs(s.with_T(1), device, False)
    g = torch.Generator(device=device).manual_seed(5)
    w = [t.unsqueeze(0) + 0.01 * torch.randn(s.B, *t.shape, device=device, generator=g)
         for t in (w1, w2)]
    st = MemoryState(tuple(w), tuple(0.01 * torch.randn_like(t) for t in w),
                     tuple(t.clone() for t in w),
                     torch.randint(0, s.chunk, (s.B,), device=device, generator=g))
    if mode in ("eager", "reference"):
        backend = "torch" if mode == "reference" else "cuda"
        return lambda: neural_memory(q, k, v, lr, fg, mo, (w1, w2), chunk_size=s.chunk,
                                     residual=True, ln_weight=gamma, ln_bias=beta,
                                     initial_state=st, output_final_state=True,
                                     backend=backend)
    args = (q, k, v, lr, fg, mo, [w1, w2], gamma, beta, list(st.weights), list(st.momentum),
            list(st.chunk_weights), st.offset, s.chunk, "silu", True, 1e-6, "token")
    if mode.startswith("split"):  # the kernel at a fixed CTA split
        run = lambda: nm_ops._launch(*args, split=int(mode[5:]))  # noqa: E731
    else:
        run = lambda: nm_ops.decode_op(*args)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(DECODE_GRAPH_STEPS):
            run()
    return graph.replay


def decode_rows(s: Shape, device, rows):
    """Decode-step rows at batches DECODE_BATCHES: time, GB/s against decode_bytes and the
    fraction of the HBM bound."""
    for B in DECODE_BATCHES:
        sb = dataclasses.replace(s, name=f"decode B{B}", B=B, T=1)
        splits = [f"split{p}" for p in (1, 2, 4, 8)] if B == DECODE_BATCHES[0] else []
        for mode in ["graph", "eager", "reference"] + splits:
            ms, _ = time_fn(bench_decode(sb, device, mode), device)
            ms /= DECODE_GRAPH_STEPS if mode not in ("eager", "reference") else 1
            nbytes = decode_bytes(sb)
            rows.append(dict(shape=sb.name, B=B, T=1, H=s.H, D=s.D, hidden=s.hidden,
                             chunk=s.chunk, dtype=s.dtype, method=f"decode {mode}",
                             pass_="fwd", ms=ms, tokens_per_s=B / (ms / 1e3), peak_mib=None,
                             gb_per_s=nbytes / (ms / 1e3) / 1e9,
                             roofline_fraction=(nbytes / HBM_BYTES_PER_S) / (ms / 1e3)))


def mlp_methods(device):
    """The memory-MLP blocks: kernels on the GPU (both weight layouts), forward and backward."""
    if device.type != "cuda" or titans_cuda._lib.kernels_unavailable_reason(device) is not None:
        return []
    m = []
    for block in ("memory_forward", "memory_grad"):
        for layout in ("shared", "chunk"):
            for bwd in (False, True):
                m.append((f"{block} {layout}",
                          (lambda blk, lay: lambda s, d, b: bench_mlp(s, d, blk, lay, b))(
                              block, layout), bwd, ("mlp", block, layout)))
    return m


def print_table(rows, file=sys.stdout):
    head = (f"{'shape':<10} {'method':<24} {'pass':<8} {'ms':>10} {'Mtok/s':>9} "
            f"{'peak MiB':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%roof':>6}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<10} {r['method']:<24} {r['pass_']:<8} {r['error']}", file=file)
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        gbs = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else "-"
        roof = f"{100 * r['roofline_fraction']:.0f}" if "roofline_fraction" in r else "-"
        tf = f"{r['tflops']:.2f}" if "tflops" in r else "-"
        print(f"{r['shape']:<10} {r['method']:<24} {r['pass_']:<8} {r['ms']:>10.3f} "
              f"{r['tokens_per_s'] / 1e6:>9.3f} {peak:>9} {tf:>8} {gbs:>7} {roof:>6}", file=file)


def plot(rows, path, device_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in rows:
        if "error" in r or r["pass_"] != "fwd+bwd":
            continue
        series.setdefault(r["method"], []).append((r["T"], r["ms"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (B=1)")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title(f"titans_cuda, {device_name}: H=16, D=64, hidden 256, chunk 64, bf16",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", nargs="+", default=None, choices=sorted(SHAPES),
                   help="one or more shapes, timed in this order in one process (the decode, "
                        "block rows and the sweep use the first)")
    p.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep")
    p.add_argument("--no-titans-pytorch", action="store_true")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench.json/bench.png")
    p.add_argument("--blocks", action="store_true",
                   help="only the building blocks (memory_scan, memory_forward, memory_grad)")
    p.add_argument("--decode", action="store_true", help="only the decode-step rows")
    p.add_argument("--memory", action="store_true",
                   help="only the neural_memory methods (and the sweep): no decode or block rows")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="q/k/v dtype (default: the shape's, bf16 on the GPU)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, titans_cuda=titans_cuda.__version__,
                device=torch.cuda.get_device_name() if gpu else "cpu")
    if not gpu:
        print("No CUDA GPU: timing a tiny CPU shape with the reference only (numbers say "
              "nothing about GPU speed).")
    shapes = [SHAPES[n] for n in (args.shape or ["default" if gpu else "cpu"])]
    if args.dtype is not None:
        shapes = [dataclasses.replace(sh, dtype=args.dtype) for sh in shapes]
    shape = shapes[0]
    rows = []
    if gpu and titans_cuda._lib.kernels_unavailable_reason(device) is None and not args.memory:
        decode_rows(shape, device, rows)
    if args.decode:
        print_table(rows)
        return 0
    if not args.blocks:
        for sh in shapes:
            run_shape(sh, device, methods_for(device, not args.no_titans_pytorch), rows, sh.name)
    if not args.memory:
        run_shape(shape, device, scan_methods(device), rows, "memory_scan")
        run_shape(shape, device, mlp_methods(device), rows, "memory-MLP blocks")
    sweep = []
    if gpu and not args.no_sweep and not args.blocks:
        for T in _progress(SWEEP_T, "sweep"):
            # the forward+backward methods (the fused op with its fused backward)
            run_shape(shape.with_T(T, B=1), device, [m for m in methods_for(
                device, not args.no_titans_pytorch) if m[2]], sweep, f"T={T}")
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep), f, indent=1)
    if sweep:
        plot(sweep, os.path.join(args.out, "bench.png"), meta["device"])
    print(f"# {meta['device']}, torch {meta['torch']}, {meta['date']}")
    print_table(rows)
    if sweep:
        print()
        print_table(sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
