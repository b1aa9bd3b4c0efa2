"""Loads the compiled extension ``titans_cuda._C``; when it cannot, records exactly why.

Nothing here imports CUDA eagerly: a CPU-only machine, a missing driver or a source checkout
without a build all import titans_cuda fine, and the pure-PyTorch reference serves every call.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Optional

import torch

_C = None
LOAD_ERROR: Optional[str] = None

try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - depends on how the package was built
    here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(here, "_C*.so")) and not glob.glob(os.path.join(here, "_C*.pyd")):
        LOAD_ERROR = ("the CUDA extension titans_cuda._C is not built: this is a source checkout "
                      "or a build made without nvcc (pip install . with nvcc on PATH builds it; "
                      "TITANS_REQUIRE_CUDA=1 makes a missing nvcc an error)")
    else:
        LOAD_ERROR = f"the CUDA extension titans_cuda._C failed to load: {exc}"


def extension_loaded() -> bool:
    return _C is not None


@functools.lru_cache(maxsize=None)
def kernel_image(device_index: int) -> dict:
    """Whether this binary holds code that runs on that GPU (cached per device)."""
    if _C is None:
        return {"ok": False, "error": LOAD_ERROR}
    return dict(_C.kernel_image(device_index))


def kernels_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernels can run on ``device``, else a sentence saying why not."""
    if device.type != "cuda":
        return f"the tensors are on {device}, and the kernels run on CUDA devices only"
    if _C is None:
        return LOAD_ERROR
    if torch.compiler.is_compiling():
        # Dynamo cannot trace into the pybind11 query; the custom op re-checks at run time and
        # falls back to the reference inside the op if this GPU has no matching code.
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    image = kernel_image(index)
    if not image["ok"]:
        major, minor = torch.cuda.get_device_capability(index)
        return (f"no compiled architecture in this build runs on cuda:{index} (sm_{major}{minor}); "
                f"built for {_C.build_info()['cuda_archs']}: {image['error']}")
    return None


@functools.lru_cache(maxsize=None)
def smem_per_block_optin(device_index: int) -> int:
    """Bytes of shared memory one block may opt into on that GPU (227 KiB on H100)."""
    return _C.smem_per_block_optin(device_index)


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
