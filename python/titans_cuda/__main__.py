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


def check(device: torch.device) -> bool:
    """Every kernel against the float64 reference on fresh random inputs (SPEC §7 fp32 1e-5)."""
    from ._lib import kernels_unavailable_reason
    reason = kernels_unavailable_reason(device)
    if reason is not None:
        print(f"--check: no kernel can run here ({reason}); nothing to compare.")
        return True
    tol = 1e-5
    rows = [(name, err, err <= tol) for name, err in scan_rows(device, "cuda")]
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel check (float32 vs float64 reference)':<{width}}  {'rel err':>9}  result")
    for name, err, passed in rows:
        print(f"{name:<{width}}  {err:9.2e}  {'PASS' if passed else 'FAIL'}")
    print(f"{sum(r[2] for r in rows)} passed, {sum(not r[2] for r in rows)} failed "
          f"(tolerance {tol:g})")
    return all(r[2] for r in rows)


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
