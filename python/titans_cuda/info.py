"""Diagnostics: what is installed, what was compiled, which kernels run on this machine."""
from __future__ import annotations

import platform
import sys

import torch

from . import _lib
from ._version import __version__

# Which public functions have kernels in this version, and for which configurations.
KERNELS = {
    "memory_scan": "forward and backward kernels: float32 updates, any L, d_in, d_out, B, H, "
                   "NC (float4 path when d_in*d_out % 4 == 0)",
    "memory_forward": "forward and backward kernels (tensor cores): bf16/fp16 x (one product) or "
                      "fp32 x (3xTF32 split products), float32 weights "
                      "(shared, per row, per chunk), D in (16, 32, 64, 128), depth 1, or depth 2 "
                      "with hidden % 16 == 0; silu/gelu, residual, LayerNorm",
    "memory_grad": "forward and backward (second-order terms) kernels, same configurations as "
                   "memory_forward",
    "neural_memory": "forward kernels: streaming decode for dense calls of <= 16 tokens "
                     "(bf16/fp16/fp32 q/k/v, D in (16, 32, 64, 128), depth 1, or depth 2 with "
                     "hidden <= 512 and % 4 == 0) and the chunked kernel for the rest (bf16/fp16 "
                     "q/k/v, D in (32, 64, 128), depth 1, or depth 2 with hidden % 32 == 0 up to "
                     "512, chunk in (16, 32, 64, 128) where its shared memory fits, cu_seqlens "
                     "and states included; at depth 1 an fp32 kernel for fp32 q/k/v (chunk 128 "
                     "as sub-chunks) and for D 128, clusters of 4 on sm_90+); gradients: fused "
                     "backward "
                     "kernels for either read, bf16/fp16, at depth 2 with hidden % 32 == 0 up to 512 and D 32 or "
                     "64 with chunk 16, 32 or 64 or D 128 with chunk 16 or 32 (either read: "
                     "chunk 128, and 64 at D 128, as sub-chunks) "
                     "(checkpoints every 4 chunks, the read's z2 and the "
                     "keys' fk kept by the forward; clusters on sm_90+ or CTAs exchanging "
                     "through global memory) and at depth 1 (bf16/fp16/fp32), D 32 or 64, or D "
                     "128 with chunk 16 or 32 on sm_90+ (chunk 128, and 64 at D 128, as "
                     "sub-chunks; fp32 products, checkpoints at every (sub-)chunk, clusters "
                     "of 2 or 4 CTAs at small batches on sm_90+, of 4 at D 128), the "
                     "reference's VJP elsewhere",
}
# Composed from the blocks above: runs whatever kernels they have.
COMPOSED = {"parallel_neural_memory": ("memory_grad", "memory_scan", "memory_forward")}


def info() -> dict:
    """A dict describing this installation: versions, whether the extension loaded (and why
    not), compiled architectures, the GPUs seen, and which functions have kernels here."""
    out = {
        "titans_cuda": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "extension_loaded": _lib.extension_loaded(),
        "extension_error": _lib.LOAD_ERROR,
        "torch_cuda_available": torch.cuda.is_available(),
        "devices": [],
        "kernels": {},
    }
    if _lib.extension_loaded():
        build = dict(_lib._C.build_info())
        out["compiled_archs"] = build["cuda_archs"]
        out["cuda_runtime"] = _fmt_cuda_version(build["cuda_runtime"])
        out["cuda_driver"] = _fmt_cuda_version(build["cuda_driver"]) if build["cuda_driver"] \
            else "no driver"
    reasons = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            device = torch.device("cuda", index)
            reason = _lib.kernels_unavailable_reason(device)
            reasons.append(reason)
            out["devices"].append({
                "index": index, "name": props.name,
                "capability": f"sm_{props.major}{props.minor}",
                "sms": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "kernels_run": reason is None,
                "why_not": reason,
            })
    else:
        reasons.append("no CUDA GPU is visible to torch"
                       + ("" if torch.version.cuda else " (this torch is a CPU-only build)"))
    runnable = any(r is None for r in reasons)
    for fn, what in KERNELS.items():
        if what is None:
            out["kernels"][fn] = "reference only (no kernel in this version)"
        elif runnable:
            out["kernels"][fn] = what
        else:
            out["kernels"][fn] = f"reference here: {next(r for r in reasons if r)}"
    for fn, parts in COMPOSED.items():
        out["kernels"][fn] = "composed of " + ", ".join(parts)
    return out


def _fmt_cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"
