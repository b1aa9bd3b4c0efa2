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


def check(device: torch.device) -> bool:
    """Every kernel against the float64 reference on fresh random inputs (SPEC §7 fp32 1e-5)."""
    from . import memory_scan
    from ._lib import kernels_unavailable_reason
    reason = kernels_unavailable_reason(device)
    if reason is not None:
        print(f"--check: no kernel can run here ({reason}); nothing to compare.")
        return True
    tol = 1e-5
    rows, ok = [], True
    g = torch.Generator(device=device).manual_seed(1234)
    for B, H, NC, di, do, with_s0, per_row in _scan_cases():
        kw = dict(device=device, generator=g)
        U = (torch.randn(B, H, NC, di, do, **kw), torch.randn(B, H, NC, do, di, **kw))
        alpha = torch.rand(B, NC, H, **kw)
        eta = torch.rand(B, NC, H, **kw)
        if NC:
            alpha[:, 0, 0] = 1.0  # a reset
            eta[:, -1, -1] = 0.0
        lead = (B, H) if per_row else (H,)
        W0 = tuple(torch.randn(*lead, *u.shape[-2:], **kw) for u in U)
        S0 = tuple(torch.randn(B, H, *u.shape[-2:], **kw) for u in U) if with_s0 else None
        got_w, got_s = memory_scan(U, alpha, eta, initial_weights=W0, initial_momentum=S0,
                                   backend="cuda")
        torch.cuda.synchronize(device)
        dbl = lambda ts: None if ts is None else tuple(t.double() for t in ts)  # noqa: E731
        ref_w, ref_s = memory_scan(dbl(U), alpha.double(), eta.double(),
                                   initial_weights=dbl(W0), initial_momentum=dbl(S0),
                                   backend="torch")
        err = max([_rel(a, b) for a, b in zip(got_w + got_s, ref_w + ref_s)] or [0.0])
        passed = err <= tol
        ok &= passed
        rows.append((f"memory_scan B={B} H={H} NC={NC} {di}x{do} S0={int(with_s0)} "
                     f"W0={'[B,H]' if per_row else '[H]'}", err, passed))
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel check (float32 vs float64 reference)':<{width}}  {'rel err':>9}  result")
    for name, err, passed in rows:
        print(f"{name:<{width}}  {err:9.2e}  {'PASS' if passed else 'FAIL'}")
    print(f"{sum(r[2] for r in rows)} passed, {sum(not r[2] for r in rows)} failed "
          f"(tolerance {tol:g})")
    return ok


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
