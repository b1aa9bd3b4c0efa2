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
            entry = {
                "index": index, "name": props.name,
                "capability": f"sm_{props.major}{props.minor}",
                "sms": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "kernels_run": reason is None,
                "why_not": reason,
            }
            if reason is None:
                limit = _lib.smem_per_block_optin(index)
                entry["smem_per_block_kib"] = limit // 1024
                entry["neural_memory_past_smem"] = neural_memory_past_smem(limit,
                                                                           props.major >= 9)
            out["devices"].append(entry)
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


def neural_memory_past_smem(limit: int, clusters: bool = True) -> list:
    """The neural_memory shapes whose chunked kernels cannot run on a GPU that allows ``limit``
    bytes of shared memory per block (``clusters``: and has thread-block clusters, sm_90+), for
    bf16/fp16 inputs: such a GPU runs their forward on the reference, or their gradients on the
    reference's VJP (a warning names the reason at the call). The plans depend on (depth, D,
    chunk_size) only, not on hidden. Each row: dict(depth, dim, chunk_size, part ("forward" /
    "backward"), kib (shared memory needed), why). Needs the extension."""
    from .ops.neural_memory import ops as nm_ops
    rows = []
    for depth in (1, 2):
        for dim in nm_ops.CHUNKED_DIMS:
            hidden = dim if depth == 1 else 2 * dim
            for chunk in nm_ops.CHUNKED_CHUNKS:
                if not nm_ops.chunked_shape_supported(dim, hidden, depth, chunk):
                    continue
                fwd_chunk = nm_ops.fwd_chunking(dim, depth, chunk)[0]
                bwd_chunk = nm_ops.bwd_chunking(dim, chunk)[0]
                parts = [("forward", nm_ops._smem_bytes("forward", dim, hidden, depth, fwd_chunk),
                          dim > 64 and nm_ops._takes_fwd1(dim, depth, fwd_chunk,
                                                          torch.bfloat16))]
                if nm_ops.chunked_bwd_shape_supported(dim, hidden, depth, bwd_chunk, "token"):
                    parts.append(("backward",
                                  nm_ops._smem_bytes("backward", dim, hidden, depth, bwd_chunk),
                                  depth == 1 and dim > 64))
                for part, need, wants_clusters in parts:
                    why = ("thread-block clusters, sm_90+" if wants_clusters and not clusters
                           else f"{-(-need // 1024)} KiB" if need > limit else None)
                    if why is not None:
                        rows.append(dict(depth=depth, dim=dim, chunk_size=chunk, part=part,
                                         kib=-(-need // 1024), why=why))
    return rows


def _fmt_cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"
