"""python -m titans_cuda [--check] [--json]: diagnostics, and a kernel-vs-reference check."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .info import info


def _print_info(data: dict) -> None:
    print(f"titans_cuda {data['titans_cuda']}  torch {data['torch']}  python {data['python']}")
    if data["extension_loaded"]:
        print(f"extension   loaded: archs {data['compiled_archs']}, CUDA runtime "
              f"{data['cuda_runtime']} (static), driver {data['cuda_driver']}")
    else:
        print(f"extension   NOT loaded: {data['extension_error']}")
    if not data["devices"]:
        print("GPU         none visible to torch" +
              ("" if torch.version.cuda else " (CPU-only torch build)"))
    for d in data["devices"]:
        status = "kernels run" if d["kernels_run"] else f"kernels do not run: {d['why_not']}"
        print(f"GPU {d['index']}       {d['name']} ({d['capability']}, {d['sms']} SMs, "
              f"{d['memory_gib']} GiB): {status}")
        if "neural_memory_past_smem" in d:
            past = d["neural_memory_past_smem"]
            print(f"            {d['smem_per_block_kib']} KiB of shared memory per block: " +
                  ("every neural_memory chunked shape runs on the kernels" if not past else
                   "neural_memory (bf16/fp16) runs these on the reference:"))
            shapes = {}
            for r in past:
                shapes.setdefault((r["depth"], r["dim"], r["chunk_size"]), []).append(
                    f"{r['part']} (needs {r['why']})")
            for (depth, dim, chunk), parts in shapes.items():
                print(f"              depth {depth}, D {dim}, chunk_size {chunk}: "
                      + ", ".join(parts))
    print("functions:")
    for fn, what in data["kernels"].items():
        print(f"  {fn:<15} {what}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _scan_cases():
    # (B, H, NC, d_in, d_out, with S0, per-row W0)
    return [(2, 4, 16, 64, 256, True, False), (1, 3, 7, 5, 3, False, True),
            (3, 2, 33, 32, 32, True, True), (2, 16, 128, 64, 256, False, False),
            (1, 1, 1, 1, 1, True, False), (2, 2, 0, 8, 8, True, False)]


def _grads(outputs, inputs, cotangents):
    """Gradients of sum(output * cotangent) w.r.t. inputs, zeros where nothing flows (NC = 0)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    grads = torch.autograd.grad([p[0] for p in pairs], inputs, [p[1] for p in pairs],
                                allow_unused=True) if pairs else [None] * len(inputs)
    return [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, inputs)]


def scan_rows(device: torch.device, backend: str, cases=None):
    """memory_scan forward outputs and every input gradient with ``backend`` on ``device`` (fp32)
    against the float64 reference on the same device: a list of (name, rel err) rows."""
    from . import memory_scan
    rows = []
    g = torch.Generator(device=device).manual_seed(1234)
    dbl = lambda ts: tuple(t.detach().double().requires_grad_(True) for t in ts)  # noqa
    for B, H, NC, di, do, with_s0, per_row in cases or _scan_cases():
        kw = dict(device=device, generator=g)
        U = (torch.randn(B, H, NC, di, do, **kw), torch.randn(B, H, NC, do, di, **kw))
        alpha = torch.rand(B, NC, H, **kw)
        eta = torch.rand(B, NC, H, **kw)
        if NC:
            alpha[:, 0, 0] = 1.0  # a reset
            eta[:, -1, -1] = 0.0
        lead = (B, H) if per_row else (H,)
        W0 = tuple(torch.randn(*lead, *u.shape[-2:], **kw) for u in U)
        S0 = tuple(torch.randn(B, H, *u.shape[-2:], **kw) for u in U) if with_s0 else ()
        inputs = tuple(t.requires_grad_(True) for t in (*U, alpha, eta, *W0, *S0))

        def run(ts, be):
            u, a, e, w0, s0 = ts[:2], ts[2], ts[3], ts[4:6], ts[6:]
            w_all, s_last = memory_scan(u, a, e, initial_weights=w0,
                                        initial_momentum=s0 if s0 else None, backend=be)
            return w_all + s_last
        got = run(inputs, backend)
        cot = [torch.randn(o.shape, **kw) for o in got]
        ref_inputs = dbl(inputs)
        ref = run(ref_inputs, "torch")
        got_grads = _grads(got, inputs, cot)
        ref_grads = _grads(ref, ref_inputs, [c.double() for c in cot])
        name = (f"B={B} H={H} NC={NC} {di}x{do} S0={int(with_s0)} "
                f"W0={'[B,H]' if per_row else '[H]'}")
        rows.append((f"memory_scan fwd {name}",
                     max([_rel(a, b) for a, b in zip(got, ref)] or [0.0])))
        rows.append((f"memory_scan bwd {name}",
                     max(_rel(a, b) for a, b in zip(got_grads, ref_grads))))
    return rows


def _mlp_cases():
    # (B, T, H, D, hidden, depth, chunk, weight layout, dtype, LN, residual, activation)
    return [(2, 256, 4, 64, 256, 2, 64, "chunk", torch.bfloat16, True, True, "silu"),
            (1, 100, 2, 32, 64, 2, 48, "shared", torch.float16, False, True, "gelu"),
            (2, 130, 2, 128, 512, 2, 100, "row", torch.bfloat16, True, False, "silu"),
            (1, 70, 3, 16, 16, 1, 16, "chunk", torch.float16, True, True, "gelu"),
            (2, 200, 2, 64, 256, 2, 64, "chunk", torch.float32, True, True, "silu"),
            (1, 90, 2, 128, 128, 1, 32, "shared", torch.float32, True, False, "gelu")]


SPEC_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def mlp_rows(device: torch.device, backend: str, cases=None):
    """memory_forward and memory_grad (outputs, and every input gradient) with ``backend`` on
    ``device`` against the float64 reference on the same rounded inputs: (name, rel err, tol)."""
    from . import memory_forward, memory_grad
    rows = []
    g = torch.Generator(device=device).manual_seed(4321)
    for B, T, H, D, hid, depth, C, layout, dtype, ln, res, act in cases or _mlp_cases():
        kw = dict(device=device, generator=g)
        n_chunks = -(-T // C)
        lead = {"shared": (H,), "row": (B, H), "chunk": (B, H, n_chunks)}[layout]
        dims = [D] + [hid] * (depth - 1) + [D]
        ws = [torch.randn(*lead, a, b_, **kw) / a ** 0.5 for a, b_ in zip(dims[:-1], dims[1:])]
        x = torch.randn(B, T, H, D, **kw).to(dtype)
        v = torch.randn(B, T, H, D, **kw).to(dtype)
        lr = 0.5 * torch.rand(B, T, H, **kw)
        lnp = [1 + 0.2 * torch.randn(H, D, **kw), 0.2 * torch.randn(H, D, **kw)] if ln else []
        cs = C if layout == "chunk" else None
        name = f"{tuple(lead)} D={D} h={hid} L={depth} C={C} {str(dtype)[6:]}"

        def fwd(ts, be):
            x_, w_, ln_ = ts[0], ts[1:1 + depth], ts[1 + depth:]
            return (memory_forward(x_, tuple(w_), chunk_size=cs, activation=act, residual=res,
                                   ln_weight=ln_[0] if ln else None,
                                   ln_bias=ln_[1] if ln else None, backend=be),)

        def grad(ts, be):
            k_, v_, lr_, w_, ln_ = ts[0], ts[1], ts[2], ts[3:3 + depth], ts[3 + depth:]
            return memory_grad(k_, v_, lr_, tuple(w_), chunk_size=C, activation=act,
                               residual=res, ln_weight=ln_[0] if ln else None,
                               ln_bias=ln_[1] if ln else None, backend=be)
        for block, fn, inputs in (("memory_forward", fwd, [x, *ws, *lnp]),
                                  ("memory_grad", grad, [x, v, lr, *ws, *lnp])):
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
            got, ref = fn(leaves, backend), fn(ref_leaves, "torch")
            cot = [torch.randn(o.shape, dtype=torch.float64, **kw) for o in ref]
            got_grads = _grads(got, leaves, [c.to(o.dtype) for c, o in zip(cot, got)])
            ref_grads = _grads(ref, ref_leaves, cot)
            tol = SPEC_TOL[dtype]
            rows.append((f"{block} fwd {name}", max(_rel(a, b) for a, b in zip(got, ref)), tol))
            rows.append((f"{block} bwd {name}",
                         max(_rel(a, b) for a, b in zip(got_grads, ref_grads)), tol))
    return rows


def _decode_cases():
    # (N, T, H, D, hidden, depth, chunk, dtype, LN, residual, activation, read)
    return [(2, 1, 4, 64, 256, 2, 64, torch.bfloat16, True, True, "silu", "token"),
            (3, 5, 2, 32, 64, 2, 4, torch.float32, True, False, "gelu", "chunk"),
            (2, 3, 2, 16, 16, 1, 2, torch.float16, False, True, "silu", "token")]


def _chunked_cases():
    # longer calls: the chunked kernel (bf16/fp16 only); same fields as _decode_cases
    return [(2, 150, 4, 64, 256, 2, 64, torch.bfloat16, True, True, "silu", "token"),
            (3, 70, 2, 32, 64, 2, 16, torch.float16, True, False, "gelu", "chunk"),
            (2, 40, 2, 128, 128, 1, 32, torch.float16, False, True, "silu", "token")]


def decode_rows(device: torch.device, backend: str, cases=None, label="decode"):
    """neural_memory from a random state with open chunks (short calls: the decode kernel under
    backend "cuda"; label "chunked" with _chunked_cases: the chunked kernel), against the
    float64 reference: (name, rel err, tol) for o, and for the final state (the decode kernel's
    fp32 math: 1e-5 whatever the input dtype; the chunked kernel's split-bf16 products: the
    input dtype's bound)."""
    from . import MemoryState, neural_memory
    rows = []
    g = torch.Generator(device=device).manual_seed(99)
    for N, T, H, D, hid, depth, C, dtype, ln, res, act, read in cases or _decode_cases():
        kw = dict(device=device, generator=g)
        dims = [D] + [hid] * (depth - 1) + [D]
        ws = [torch.randn(H, a, b_, **kw) / a ** 0.5 for a, b_ in zip(dims[:-1], dims[1:])]
        w = [t + 0.1 * torch.randn(N, *t.shape, **kw) for t in ws]
        st = MemoryState(tuple(w), tuple(0.05 * torch.randn(t.shape, **kw) for t in w),
                         tuple(t + 0.05 * torch.randn(t.shape, **kw) for t in w),
                         torch.randint(0, C, (N,), **kw))
        x = [torch.randn(N, T, H, D, **kw).to(dtype) for _ in range(3)]
        gates = [0.5 * torch.rand(N, T, H, **kw), torch.rand(N, T, H, **kw) ** 3,
                 torch.rand(N, T, H, **kw)]
        gamma = 1 + 0.2 * torch.randn(H, D, **kw) if ln else None

        def run(to, be):
            cast = (lambda t: t.to(to)) if to else (lambda t: t)  # noqa: E731
            s = MemoryState(*(tuple(cast(t) for t in f) for f in (st.weights, st.momentum,
                                                                   st.chunk_weights)), st.offset)
            return neural_memory(*(cast(t) for t in x + gates), tuple(cast(t) for t in ws),
                                 chunk_size=C, activation=act, residual=res, read=read,
                                 ln_weight=None if gamma is None else cast(gamma),
                                 initial_state=s, output_final_state=True, backend=be)
        (o, s), (o_ref, s_ref) = run(None, backend), run(torch.float64, "torch")
        name = f"N={N} T={T} D={D} h={hid} L={depth} C={C} {read} {str(dtype)[6:]}"
        rows.append((f"{label} out   {name}", _rel(o, o_ref), SPEC_TOL[dtype]))
        rows.append((f"{label} state {name}", max(
            _rel(a, b) for a, b in zip(s.weights + s.momentum + s.chunk_weights,
                                       s_ref.weights + s_ref.momentum + s_ref.chunk_weights)),
            1e-5 if label == "decode" else SPEC_TOL[dtype]))
    return rows


def check(device: torch.device) -> bool:
    """Every kernel against the float64 reference on fresh random inputs, within SPEC §7 (fp32
    1e-5; bf16 2e-2 and fp16 5e-3 for the outputs of bf16 / fp16 inputs)."""
    from ._lib import kernels_unavailable_reason
    reason = kernels_unavailable_reason(device)
    if reason is not None:
        print(f"--check: no kernel can run here ({reason}); nothing to compare.")
        return True
    rows = [(name, err, 1e-5) for name, err in scan_rows(device, "cuda")]
    rows += mlp_rows(device, "cuda")
    rows += decode_rows(device, "cuda")
    rows += decode_rows(device, "cuda", _chunked_cases(), label="chunked")
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel check (vs float64 reference)':<{width}}  {'rel err':>9}  {'tol':>7}  result")
    for name, err, tol in rows:
        print(f"{name:<{width}}  {err:9.2e}  {tol:7.0e}  {'PASS' if err <= tol else 'FAIL'}")
    passed = sum(err <= tol for _, err, tol in rows)
    print(f"{passed} passed, {len(rows) - passed} failed (SPEC §7 tolerances)")
    return passed == len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titans_cuda", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="compare every kernel that runs here with the float64 reference")
    parser.add_argument("--json", action="store_true", help="print info() as JSON")
    parser.add_argument("--device", default="cuda", help="device for --check (default cuda)")
    args = parser.parse_args(argv)
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_info(data)
    if args.check:
        print()
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--check: no CUDA GPU visible; nothing to compare.")
            return 0
        return 0 if check(device) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
