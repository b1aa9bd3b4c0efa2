"""Custom ops over the neural_memory kernels:

  titans_cuda::neural_memory_decode   a short call (T <= DECODE_MAX_T tokens, dense batch) on
                                      the state, token by token (csrc/neural_memory/decode.cu)
  titans_cuda::neural_memory_chunked  any call, chunk by chunk through the dual form
                                      (csrc/neural_memory/chunked.cu), cu_seqlens included

Both return [o, W per layer, S per layer, chunk weights per layer]. The kernels cover the forward
pass and the final state. Gradients (the ``*_bwd`` ops): the fused backward kernel of the chunked
op (csrc/neural_memory/chunked_bwd.cu: depth 2 and depth 1 kernels) where chunked_bwd_reason
allows, else the reference through ``torch.func.vjp`` (exact, not fast). Off the kernel path
(CPU, float64, unsupported shapes) the ops run the reference, so opcheck runs in CPU CI. Eager
calls from ``fused`` reach the same implementations through ``_Direct`` (an
autograd.Function) instead of the dispatcher (host time; docs/design.md), the ops serving
torch.compile, dispatch modes and torch.func.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ... import _lib
from ...state import MemoryState, own_offset
from ..activations import ACTIVATIONS
from ..memory_mlp.ops import KERNEL_DTYPES, _reference_vjp
from ..memory_mlp.reference import compute_dtype
from . import reference as ref

_UNSET = object()  # an argument not given (None is a value: "the kernel runs")

DECODE_MAX_T = 16  # longer calls wait for the chunked fused kernel
DECODE_DIMS = (16, 32, 64, 128)
DECODE_MAX_HIDDEN = 512  # kDecodeMaxHidden in decode.h


def decode_shape_supported(dim: int, hidden: int, depth: int) -> bool:
    """The rule of neural_memory_decode_supported (decode.h); a GPU test checks they agree."""
    return dim in DECODE_DIMS and (depth == 1 or (depth == 2 and 4 <= hidden <= DECODE_MAX_HIDDEN
                                                  and hidden % 4 == 0))


def _device_reason(q: Tensor, weights, initial_state) -> Optional[str]:
    """What rules out both neural_memory kernels: the device, the build, float64 tensors."""
    if not q.is_cuda:
        return "the inputs are not on a CUDA device"
    reason = _lib.kernels_unavailable_reason(q.device)
    if reason is not None:
        return reason
    tensors = list(weights) + ([] if initial_state is None else
                               [*initial_state.weights, *initial_state.momentum,
                                *initial_state.chunk_weights])
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 weights or states run on the reference"
    return None


def decode_reason(q: Tensor, weights, cu_seqlens, initial_state) -> Optional[str]:
    """None when the decode kernel handles this neural_memory call, else why not."""
    reason = _device_reason(q, weights, initial_state)
    if reason is not None:
        return reason
    T = q.shape[1]
    if T > DECODE_MAX_T:
        return (f"no fused CUDA kernel for neural_memory calls of T={T} > {DECODE_MAX_T} tokens "
                f"exists in this version yet (the streaming-decode kernel takes T <= "
                f"{DECODE_MAX_T})")
    if T == 0:
        return "the call has no tokens"
    if cu_seqlens is not None:
        return "the decode kernel does not take cu_seqlens yet (pass [N, T, H, D] batches)"
    if q.dtype not in KERNEL_DTYPES:
        return f"the decode kernel takes bf16/fp16/fp32 inputs, got {q.dtype}"
    D = q.shape[-1]
    depth = len(weights)
    hidden = weights[0].shape[-1]
    if not decode_shape_supported(D, hidden, depth):
        return (f"no decode kernel for D={D}, hidden={hidden}, depth={depth} (supported: D in "
                f"{DECODE_DIMS}, depth 1, or depth 2 with hidden a multiple of 4 up to "
                f"{DECODE_MAX_HIDDEN})")
    H = q.shape[2]
    if H > 65535:
        return f"no decode kernel for H={H} > 65535"
    return None


CHUNKED_DTYPES = (torch.bfloat16, torch.float16)
CHUNKED_DIMS = (32, 64, 128)
CHUNKED_CHUNKS = (16, 32, 64, 128)
CHUNKED_HIDDEN_BLOCK = 32  # kHB in chunked_kernel.cuh


def chunked_shape_supported(dim: int, hidden: int, depth: int, chunk: int,
                            dtype: torch.dtype = torch.bfloat16) -> bool:
    """The rule of neural_memory_chunked_supported (chunked.cu) for a call's chunk; a GPU test
    checks they agree. fp32 inputs: depth 1 (the depth-1 fp32 kernel; chunk 128 as sub-chunks,
    fwd_chunking). Whether the shared-memory plan fits the GPU is checked apart."""
    hb = CHUNKED_HIDDEN_BLOCK
    if dtype == torch.float32 and depth != 1:
        return False
    return (dtype in KERNEL_DTYPES and dim in CHUNKED_DIMS and chunk in CHUNKED_CHUNKS and
            (depth == 1 or (depth == 2 and hb <= hidden <= 512 and hidden % hb == 0)))


def _takes_fwd1(dim: int, depth: int, chunk: int, dtype: torch.dtype) -> bool:
    """chunked.cu's takes_fwd1: the depth-1 fp32 kernel runs fp32 inputs, and D = 128 with
    chunk 64 (as a cluster of 4 CTAs: sm_90+), at depth 1 with chunks up to 64. (At D = 128
    with chunks 16 / 32 it also runs bf16 / fp16 at small batches where clusters fit, the
    split-bf16 kernel elsewhere: f1_preferred.)"""
    return depth == 1 and chunk <= 64 and (dtype == torch.float32 or (dim == 128 and chunk == 64))


def fwd_chunking(dim: int, depth: int, chunk: int,
                 dtype: torch.dtype = torch.bfloat16) -> Tuple[int, int]:
    """(the chunked forward's chunk, sub-chunks R per call chunk): chunk 128 runs as sub-chunks
    where no kernel of the call's chunk fits a block (params.h, sub; every sub-chunk takes its
    gradient at its call chunk's start weights): at depth 2 as 2 x 64 at D = 64 or 128, at
    depth 1 as 4 x 32 at D = 128 and, for fp32 inputs (the depth-1 fp32 kernel's chunks go to
    64), as 2 x 64 at D <= 64; else (chunk, 1). A depth-1 forward that keeps checkpoints for
    the fused backward walks that backward's sub-chunks instead (_ckpt_chunking)."""
    if depth == 2 and chunk == 128 and dim in (64, 128):
        return 64, 2
    if depth == 1 and chunk == 128 and dim == 128:
        return 32, 4
    if depth == 1 and chunk == 128 and dtype == torch.float32:
        return 64, 2
    return chunk, 1


def _lacks_clusters(device) -> bool:
    """The depth-1 kernels at D = 128 run as thread-block clusters: whether ``device`` has none
    (below sm_90). Under torch.compile it reports clusters, as _smem reports a fit: the ops
    check again when they run."""
    return not torch.compiler.is_compiling() and torch.cuda.get_device_capability(device)[0] < 9


def _smem(kernel: str, dim: int, hidden: int, depth: int, chunk: int, device,
          dtype: torch.dtype = torch.bfloat16):
    """(bytes of shared memory per block the chunked "forward" / "backward" kernel needs for
    inputs of ``dtype``, bytes the device allows). Under torch.compile (Dynamo cannot trace the
    extension's queries) it reports a fit: the ops check again when they run, and fall back to
    the reference there."""
    if torch.compiler.is_compiling():
        return 0, 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    # int(): a fake tensor's sizes may be SymInts (opcheck's dynamic shapes), which the cache
    # cannot hash; the query specialised on them before it was cached too
    return (_smem_bytes(kernel, int(dim), int(hidden), int(depth), int(chunk),
                        KERNEL_DTYPES.index(dtype)),
            _lib.smem_per_block_optin(index))


@functools.lru_cache(maxsize=None)
def _smem_bytes(kernel, dim, hidden, depth, chunk, dtype=0) -> int:
    query = (_lib._C.neural_memory_chunked_smem_bytes if kernel == "forward"
             else _lib._C.neural_memory_chunked_bwd_smem_bytes)
    return query(dim=dim, hidden=hidden, depth=depth, chunk=chunk, dtype=dtype)


def chunked_reason(q: Tensor, weights, chunk_size: int, cu_seqlens,
                   initial_state) -> Optional[str]:
    """None when the chunked kernel handles this neural_memory call, else why not."""
    reason = _device_reason(q, weights, initial_state)
    if reason is not None:
        return reason
    D, depth = q.shape[-1], len(weights)
    if q.dtype not in CHUNKED_DTYPES and not (q.dtype == torch.float32 and depth == 1):
        return (f"the chunked kernel takes bf16/fp16 inputs, and fp32 at depth 1, in this "
                f"version; got {q.dtype} at depth {depth} (that runs on the reference)")
    if q.shape[1] == 0:
        return "the call has no tokens"
    hidden = weights[0].shape[-1]
    if not chunked_shape_supported(D, hidden, depth, chunk_size, q.dtype):
        return (f"no chunked kernel for D={D}, hidden={hidden}, depth={depth}, "
                f"chunk_size={chunk_size}, {q.dtype} (supported: D in {CHUNKED_DIMS}, "
                f"chunk_size in {CHUNKED_CHUNKS}, depth 1 (fp32 too), or depth 2 with "
                f"hidden a multiple of {CHUNKED_HIDDEN_BLOCK} up to 512)")
    kchunk = fwd_chunking(D, depth, int(chunk_size), q.dtype)[0]
    if D > 64 and _takes_fwd1(D, depth, kchunk, q.dtype) and _lacks_clusters(q.device):
        return (f"the chunked kernel for D={D} at depth 1 with {q.dtype}, chunk_size="
                f"{chunk_size} runs as a thread-block cluster (sm_90+)")
    smem, limit = _smem("forward", D, hidden, depth, kchunk, q.device, q.dtype)
    if smem > limit:
        return (f"the chunked kernel for D={D}, depth={depth}, chunk_size={chunk_size} needs "
                f"{smem // 1024} KiB of shared memory per block and this GPU allows "
                f"{limit // 1024} KiB")
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if q.shape[2] > 65535 or n_seq > 65535:
        return f"no chunked kernel for H={q.shape[2]} or {n_seq} sequences > 65535"
    return None


def chunked_bwd_shape_supported(dim: int, hidden: int, depth: int, chunk: int,
                                read: str) -> bool:
    """The rule of neural_memory_chunked_bwd_supported (chunked_bwd.cu): either read, D 32 or
    64 with chunk 16, 32 or 64, or D 128 with chunk 16 or 32; depth 1, or depth 2 with hidden a
    multiple of 32 up to 512 (bf16/fp16 inputs, and fp32 at depth 1, as chunked_reason
    allows). Depth 1 at D 128 also needs clusters (chunked_bwd_reason)."""
    hb = CHUNKED_HIDDEN_BLOCK
    dim_ok = dim in (32, 64) or (dim == 128 and chunk <= 32)
    return (dim_ok and chunk in (16, 32, 64) and read in ("token", "chunk") and
            ((depth == 1 and hidden == dim) or
             (depth == 2 and hb <= hidden <= 512 and hidden % hb == 0)))


def bwd_chunking(dim: int, chunk: int) -> Tuple[int, int]:
    """(the fused backward's chunk, sub-chunks R per call chunk): a call chunk whose backward
    has no instance (shared memory: chunk 128 at D <= 64, chunks 64 and 128 at D = 128) runs
    as R sub-chunks of chunk / R tokens (either read, both depths, every input dtype), each
    taking its gradient at, and for read "chunk" reading through, the weights of its call
    chunk's start (chunked_bwd.h, sub); else (chunk, 1). The same rule at both depths
    (params.h, neural_memory_bwd_sub_chunk, is the kernels' side)."""
    if dim <= 64 and chunk == 128:
        return 64, 2
    if dim == 128 and chunk in (64, 128):
        return 32, chunk // 32
    return chunk, 1


def _ckpt_chunking(dim: int, depth: int, chunk: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(the chunk, sub-chunks R) of a chunked forward that keeps checkpoints for the fused
    backward: at depth 1 that backward's (it reads every one of its chunks' start states, so
    the forward walks the same sub-chunks), else fwd_chunking's."""
    return bwd_chunking(dim, chunk) if depth == 1 else fwd_chunking(dim, depth, chunk, dtype)


def chunked_bwd_reason(q: Tensor, weights, chunk_size: int, cu_seqlens, initial_state,
                       read: str, fwd_reason=_UNSET) -> Optional[str]:
    """None when the fused backward kernel computes this call's gradients, else why the
    reference's VJP does. ``fwd_reason``: chunked_reason's answer where the caller has it."""
    reason = (chunked_reason(q, weights, chunk_size, cu_seqlens, initial_state)
              if fwd_reason is _UNSET else fwd_reason)
    if reason is not None:
        return reason
    D, depth, hidden = q.shape[-1], len(weights), weights[0].shape[-1]
    kernel_chunk, _ = bwd_chunking(D, int(chunk_size))
    if not chunked_bwd_shape_supported(D, hidden, depth, kernel_chunk, read):
        return (f"no fused backward for D={D}, hidden={hidden}, depth={depth}, "
                f"chunk_size={chunk_size}, {q.dtype}, read={read!r} in this version "
                f"(supported: D 32 or 64 with chunk_size 16, 32 or 64, D 128 with chunk_size 16 "
                f"or 32; depth 1, or depth 2 with hidden a multiple of {CHUNKED_HIDDEN_BLOCK} "
                f"up to 512; chunk_size 128, and 64 and 128 at D 128, as sub-chunks)")
    if depth == 1 and D > 64 and _lacks_clusters(q.device):
        return (f"the fused backward at depth 1 and D={D} runs as a thread-block cluster "
                f"(sm_90+)")
    smem, limit = _smem("backward", D, hidden, depth, kernel_chunk, q.device)
    if smem > limit:
        return f"the fused backward needs {smem // 1024} KiB of shared memory per block"
    return None


def _kept_every(q, weights, chunk_size, cu_seqlens, state, read, checkpoint_every,
                bwd_reason=_UNSET) -> int:
    """The checkpoint interval chunked_op keeps for the fused backward: ``checkpoint_every``
    where the fused backward will run (``bwd_reason``: chunked_bwd_reason's answer where the
    caller has it; 1 at depth 1, whose backward reads every chunk's start state), else 0
    (nothing kept)."""
    if checkpoint_every <= 0:
        return 0
    if bwd_reason is _UNSET:
        bwd_reason = chunked_bwd_reason(q, weights, chunk_size, cu_seqlens, state, read)
    if bwd_reason is not None:
        return 0
    return 1 if len(weights) == 1 else int(checkpoint_every)


def _checkpoint_shape(T: int, chunk_size: int, K: int, has_state: bool, sub: int = 1):
    """(n_ckpt,): checkpoint slots for T tokens per row (an open chunk adds one), every K-th
    chunk (as _launch allocates them); ``sub`` > 1 (depth 1, _ckpt_chunking): every sub-chunk's
    (of C / sub tokens; offsets count in call chunks, up to C - 1)."""
    C = int(chunk_size)
    if sub > 1:
        return (max(1, -(-(T + (C - 1 if has_state else 0)) // (C // sub))),)
    most = -(-(T + (C - 1 if has_state else 0)) // C)
    return (max(1, -(-most // K)),)


def _f32(t: Tensor) -> Tensor:
    """fp32, contiguous, 16-byte aligned (the kernel reads float4)."""
    t = t.to(torch.float32).contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def _qkv(t: Tensor) -> Tensor:
    """q, k or v as the kernels read it: the feature axis contiguous and every row's start
    16-byte aligned (the bf16 chunked kernel copies rows into shared memory by 16-byte
    cp.async; the others load two elements at a time), else a contiguous copy."""
    step = 16 // t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and \
            all(s % step == 0 for d, s in zip(t.shape[:-1], t.stride()[:-1]) if d > 1):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _launch(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
            state_momentum, state_chunk_weights, state_offset, chunk_size, activation,
            residual, ln_eps, read, cu_seqlens: Optional[Tensor] = None,
            out: Optional[List[Tensor]] = None, split: int = 0,
            kernel: str = "decode", checkpoint_every: int = 0, bwd=None,
            run_forward: bool = True) -> List[Tensor]:
    """Runs a kernel ("decode" or "chunked"): [o, W..., S..., chunk weights...]. ``out``:
    preallocated outputs in that order (the tests pass NaN-poisoned ones); ``split``: CTAs per
    (sequence, head), a thread-block cluster on sm_90+ (s > 0) or ordinary CTAs exchanging
    through global memory (s < 0, chunked depth 2), 0 lets the launcher choose (params.h).
    ``checkpoint_every`` = K > 0 (chunked only): also returns, per layer, the W then the S at
    the start of chunks 0, K, 2K, ... as [n_ckpt, N, H, d_in, d_out] (params.h; slots past a
    sequence's last chunk are left unwritten), then at depth 2 the read's z2 (its output before
    the head) and the keys' fk (the memory's output for the keys at the chunk's gradient
    weights, the keys' head's input), fp32 [B, T, H, D] each (either read): the fused
    backward's inputs. ``bwd`` (chunked, with ``checkpoint_every``):
    a function of the checkpoints returning the backward kernel's own arguments, launched right
    after the forward on the same arguments (_fused_grads); ``run_forward`` False launches the
    backward alone (on checkpoints the forward op kept)."""
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    depth = len(weights)
    dev = q.device
    q, k, v = _qkv(q), _qkv(k), _qkv(v)
    gates = [_f32(g) for g in (lr, forget, momentum)]
    keep = [q, k, v, *gates]
    args = dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
                lr=gates[0].data_ptr(), forget=gates[1].data_ptr(),
                momentum=gates[2].data_ptr())
    for name, t in (("q", q), ("k", k), ("v", v)):
        args.update({f"{name}_n_stride": t.stride(0), f"{name}_t_stride": t.stride(1),
                     f"{name}_h_stride": t.stride(2)})
    w_in, w_n, w_h, s_in, cw_in = [], [], [], [], []
    outs_w, outs_s, outs_cw = [], [], []
    for layer, w in enumerate(weights):
        shape = (N, H, w.shape[-2], w.shape[-1])
        if state_weights:
            src = _f32(state_weights[layer])
            s = _f32(state_momentum[layer])
            cw = _f32(state_chunk_weights[layer])
            keep += [src, s, cw]
            w_in.append(src.data_ptr())
            w_n.append(src.stride(0))
            w_h.append(src.stride(1))
            s_in.append(s.data_ptr())
            cw_in.append(cw.data_ptr())
        else:
            src = _f32(w)
            keep.append(src)
            w_in.append(src.data_ptr())
            w_n.append(0)
            w_h.append(src.stride(0))
            s_in.append(0)
            cw_in.append(0)
        if run_forward:  # (the backward writes none of the forward's outputs)
            for lst in (outs_w, outs_s, outs_cw):
                lst.append(torch.empty(shape, dtype=torch.float32, device=dev))
    o = torch.empty(B, T, H, D, dtype=q.dtype, device=dev) if run_forward else None
    if out is not None:
        o, outs_w, outs_s, outs_cw = (out[0], out[1:1 + depth], out[1 + depth:1 + 2 * depth],
                                      out[1 + 2 * depth:])
    offset = None
    if state_offset is not None and state_weights:
        # int64, as MemoryState keeps it: no conversion launch on a decode step
        offset = state_offset.to(device=dev, dtype=torch.int64).contiguous()
        keep.append(offset)
    ln_w = None if ln_weight is None else _f32(ln_weight)
    ln_b = None if ln_bias is None or ln_w is None else _f32(ln_bias)
    keep += [t for t in (ln_w, ln_b) if t is not None]
    cu = None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=dev, dtype=torch.int64).contiguous()
        keep.append(cu)
    args.update(cu_seqlens=0 if cu is None else cu.data_ptr(), w_in=w_in, w_in_n_stride=w_n,
                w_in_h_stride=w_h, s_in=s_in, cw_in=cw_in,
                w_out=[t.data_ptr() for t in outs_w] or [0] * depth,
                s_out=[t.data_ptr() for t in outs_s] or [0] * depth,
                cw_out=[t.data_ptr() for t in outs_cw] or [0] * depth,
                offset=0 if offset is None else offset.data_ptr(),
                ln_weight=0 if ln_w is None else ln_w.data_ptr(),
                ln_bias=0 if ln_b is None else ln_b.data_ptr(), ln_eps=float(ln_eps),
                o=0 if o is None else o.data_ptr(), n_seq=N, seqlen=T, heads=H, dim=D,
                hidden=weights[0].shape[-1] if depth == 2 else D, depth=depth,
                chunk=int(chunk_size), activation=ACTIVATIONS.index(activation),
                residual=bool(residual), read_chunk=read == "chunk",
                dtype=KERNEL_DTYPES.index(q.dtype), split=int(split),
                stream=_lib.stream_handle(dev),
                device=dev.index if dev.index is not None else torch.cuda.current_device())
    ckpts = []
    # sub-chunks (params.h): the kernel's chunk where the call's has no instance that fits (at
    # depth 1 with checkpoints, the backward's: _ckpt_chunking)
    kchunk, sub = (0, 1) if kernel != "chunked" else (
        _ckpt_chunking(D, depth, int(chunk_size), q.dtype) if checkpoint_every > 0
        else fwd_chunking(D, depth, int(chunk_size), q.dtype))
    if sub > 1:
        args.update(chunk=kchunk, sub=sub)
    if run_forward and kernel == "chunked" and depth == 2 and (split < 0 or (
            split == 0 and FORWARD_GLOBAL_SPLIT and 2 * N * H <= _sm_count(args["device"]))):
        # a split over ordinary CTAs may be taken (params.h): the exchange for the most CTAs
        # per (sequence, head), and a zeroed counter per pair; sized by the kernel's chunk
        # (a sub-chunk where the call's chunk runs as several)
        xfloats = _lib._C.neural_memory_chunked_exchange_floats(dim=D, chunk=args["chunk"])
        exchange = torch.empty(N * H * xfloats, dtype=torch.float32, device=dev)
        arrivals = torch.zeros(N * H * _lib._C.neural_memory_arrival_stride(), dtype=torch.int32,
                               device=dev)
        keep += [exchange, arrivals]
        args.update(exchange=exchange.data_ptr(), arrivals=arrivals.data_ptr())
    if kernel == "chunked":
        K = int(checkpoint_every)
        if K > 0:  # chunks on the padded timeline: at most ceil((offset + length) / C)
            n_ckpt, = _checkpoint_shape(T, chunk_size, K, bool(state_weights),
                                        sub if depth == 1 else 1)
            ckpts = [torch.empty(n_ckpt, N, H, w.shape[-2], w.shape[-1], dtype=torch.float32,
                                 device=dev) for _ in range(2) for w in weights]
            if depth == 2:  # (the depth-1 backward recomputes the read and the keys)
                ckpts += [torch.empty(B, T, H, D, dtype=torch.float32, device=dev)
                          for _ in range(2)]  # z2, fk
                args.update(read_z2=ckpts[-2].data_ptr(), keys_fk=ckpts[-1].data_ptr())
        # (depth 1: every sub-chunk's start state; depth 2: every K-th call chunk's)
        args.update(ckpt_every=max(K, 0) * (1 if depth == 1 else sub),
                    ckpt_w=[t.data_ptr() for t in ckpts[:depth]],
                    ckpt_s=[t.data_ptr() for t in ckpts[depth:2 * depth]])
        if not ckpts:
            args.update(ckpt_w=[0] * depth, ckpt_s=[0] * depth)
    if run_forward:
        (_lib._C.neural_memory_decode if kernel == "decode"
         else _lib._C.neural_memory_chunked)(args)
    if bwd is not None:
        args.update(bwd(ckpts))
        _lib._C.neural_memory_chunked_bwd(args)
    return [o, *outs_w, *outs_s, *outs_cw, *ckpts]  # (o None, no states: backward alone)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _state(state_weights, state_momentum, state_chunk_weights, state_offset):
    if not state_weights:
        return None
    return MemoryState(tuple(state_weights), tuple(state_momentum), tuple(state_chunk_weights),
                       state_offset)


def _reference(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
               state_momentum, state_chunk_weights, state_offset, chunk_size, activation,
               residual, ln_eps, read, cu_seqlens=None) -> List[Tensor]:
    o, st = ref.neural_memory(
        q, k, v, lr, forget, momentum, tuple(weights), chunk_size=chunk_size,
        activation=activation, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
        ln_eps=ln_eps, read=read,
        initial_state=_state(state_weights, state_momentum, state_chunk_weights, state_offset),
        output_final_state=True, cu_seqlens=cu_seqlens)
    return [o, *st.weights, *st.momentum, *st.chunk_weights]


def _forward(kernel: str, reason: Optional[str], args, cu_seqlens=None,
             checkpoint_every: int = 0) -> List[Tensor]:
    """The body of both forward ops: the kernel when ``reason`` is None (with the chunked
    kernel's checkpoints appended when ``checkpoint_every`` > 0), else the reference."""
    if reason is None:
        return _launch(*args, cu_seqlens=cu_seqlens, kernel=kernel,
                       checkpoint_every=checkpoint_every)
    q, k, v, _, _, _, weights, _, _, sw, sm, scw = args[:12]
    inputs = {id(t) for t in (q, k, v, *weights, *sw, *sm, *scw)}
    # outputs must not alias inputs: the reference may hand an input state back unchanged
    return [t.clone() if id(t) in inputs or t._base is not None else t.contiguous()
            for t in _reference(*args, cu_seqlens=cu_seqlens)]


def _fake(q, k, v, weights, state_weights, state_momentum, state_chunk_weights, cu_seqlens=None):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    H = q.shape[2]
    tensors = [q, k, v, *weights, *state_weights, *state_momentum, *state_chunk_weights]
    dtype = compute_dtype(*tensors)
    states = [q.new_empty(N, H, w.shape[-2], w.shape[-1], dtype=dtype) for w in weights]
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            *states, *[torch.empty_like(s) for s in states],
            *[torch.empty_like(s) for s in states]]


def _reference_grads(grads, q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias,
                     state_weights, state_momentum, state_chunk_weights, state_offset, chunk_size,
                     activation, residual, ln_eps, read, cu_seqlens=None) -> List[Tensor]:
    """The body of both backward ops: the reference's VJP, in the order the ops document."""
    L, n_state = len(weights), len(state_weights)
    H, D = q.shape[2], q.shape[3]
    # outputs without a cotangent come as empty tensors (_make_backward): zeros here
    if any(g.numel() == 0 for g in grads):
        like = _fake(q, k, v, weights, state_weights, state_momentum, state_chunk_weights,
                     cu_seqlens)
        grads = [g if g.numel() == t.numel() else torch.zeros_like(t)
                 for g, t in zip(grads, like)]

    def fn(q_, k_, v_, lr_, fo_, mo_, lnw_, lnb_, *ts):
        ws, ts = list(ts[:L]), ts[L:]
        sw_, sm_, scw_ = (list(ts[i * n_state:(i + 1) * n_state]) for i in range(3))
        return tuple(_reference(q_, k_, v_, lr_, fo_, mo_, ws, lnw_, lnb_, sw_, sm_, scw_,
                                state_offset, chunk_size, activation, residual, ln_eps, read,
                                cu_seqlens))
    inputs = [q, k, v, lr, forget, momentum, ln_weight, ln_bias, *weights, *state_weights,
              *state_momentum, *state_chunk_weights]
    g = _reference_vjp(fn, inputs, list(grads))
    ln = [torch.zeros(H, D, dtype=torch.float32, device=q.device) if t is None else t
          for t in g[6:8]]
    return [t.contiguous() for t in (*g[:6], *g[8:8 + L], *ln, *g[8 + L:])]


def _offsets(q, cu_seqlens, state_offset, chunk_size):
    """(offset, final offset) per sequence, int64 on q's device: the initial state's offset into
    its open chunk (zeros without one) and (offset + length) % chunk_size after the call."""
    if cu_seqlens is None and state_offset is None:  # two launches, not four
        return (torch.zeros(q.shape[0], dtype=torch.int64, device=q.device),
                torch.full((q.shape[0],), q.shape[1] % int(chunk_size), dtype=torch.int64,
                           device=q.device))
    if cu_seqlens is None:  # T tokens a row, a scalar (no launch); state_offset is given here
        lengths = q.shape[1]
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
    offset = (torch.zeros_like(lengths) if state_offset is None
              else state_offset.to(device=q.device, dtype=torch.int64))
    return offset, (offset + lengths) % int(chunk_size)


# The chunked forward's launcher may choose a split over ordinary CTAs (the sums through global
# memory; it then gets an exchange) where it gives fewer hidden blocks per CTA than a resident
# cluster (on an H100: 4 CTAs per (sequence, head) at B = 2, T = 8192, H = 16 and 8 at B = 1,
# T = 32768, against clusters of 3 and 4). TITANS_FORWARD_GLOBAL_SPLIT=0 keeps it to clusters
# (an A/B switch; docs/perf_notes.md has the timings).
FORWARD_GLOBAL_SPLIT = os.environ.get("TITANS_FORWARD_GLOBAL_SPLIT", "1") != "0"

# CTAs per (sequence, head) of the fused backward, CTA r owning the hidden blocks b with
# b % split == r: s > 0 a cluster of s (sm_90+), s < 0 -s ordinary CTAs of a cooperative launch
# that exchange their sums through global memory; 0: the launcher's choice
# (neural_memory_chunked_bwd_plan). The tests force each split. At depth 1 only clusters: s in
# (1, 2, 4), at most D / 16, CTA r owning the output columns [r D / s, (r + 1) D / s) of W.
FUSED_BWD_SPLIT = 0
# The forward's state is kept at every K-th chunk start for the fused backward, which recomputes
# the others a group of K at a time (memory / K, time + the keys' pass and state update of the
# K - 1 recomputed chunks). Depth 2 only: depth 1 keeps every chunk's (_kept_every).
FUSED_BWD_CHECKPOINT_EVERY = 4


@functools.lru_cache(maxsize=256)
def _bwd_plan(n_seq, heads, dim, hidden, chunk, dtype, split, device) -> int:
    """neural_memory_chunked_bwd_plan: the backward's CTAs per (sequence, head), 0 if none."""
    return _lib._C.neural_memory_chunked_bwd_plan(n_seq=n_seq, heads=heads, dim=dim,
                                                  hidden=hidden, chunk=chunk, dtype=dtype,
                                                  split=split, device=device)


def _fused_grads(grads, q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias,
                 state_weights, state_momentum, state_chunk_weights, state_offset, chunk_size,
                 activation, residual, ln_eps, read, cu_seqlens=None, checkpoints=None,
                 checkpoint_every: int = 0) -> List[Tensor]:
    """_reference_grads through the kernels: the states at every K-th chunk start (O(T / (C K))
    per row), either ``checkpoints``, the forward op's kept ones (K = ``checkpoint_every``), or
    from the forward run again (K = FUSED_BWD_CHECKPOINT_EVERY); then the fused backward
    (chunked_bwd.h) walking the chunks in reverse. Same result order and dtypes."""
    B, T, H, D = q.shape
    L = len(weights)
    C = int(chunk_size)
    dev = q.device
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    has_state = bool(state_weights)
    # Without cu_seqlens or a state every sequence holds T tokens from slot 0, so whether its
    # last chunk stays open is known here (fewer small launches on the host's critical path).
    dense = cu_seqlens is None and not has_state
    if not dense:
        off, final_offset = _offsets(q, cu_seqlens, state_offset if has_state else None, C)
        still_open = (final_offset > 0).view(N, 1, 1, 1)
        zero = torch.zeros((), dtype=torch.float32, device=dev)
    g_o = (grads[0].to(q.dtype).contiguous() if grads[0].numel()
           else torch.zeros(q.shape, dtype=q.dtype, device=dev))
    # W̄ (updated in place: never an alias of a cotangent) starts as dl/dW plus, where a
    # sequence's last chunk closed (its chunk weights are then its weights), dl/dCW; the rest
    # of dl/dCW is owed to the last chunk's gradient weights (cw_owed); S̄ starts as dl/dS
    w_starts, s_starts, cw_owed = [], [], []  # (start or None, whether it is a new tensor)
    for gw, gs, gc in zip(grads[1:1 + L], grads[1 + L:1 + 2 * L], grads[1 + 2 * L:1 + 3 * L]):
        gw, gs, gc = (g.float() if g.numel() else None for g in (gw, gs, gc))  # None: no grad
        if gc is None:
            wb, owed = None, None
        elif dense and T % C > 0:
            wb, owed = None, gc.contiguous()
        elif dense:
            wb, owed = gc, None
        else:
            wb, owed = torch.where(still_open, zero, gc), torch.where(still_open, gc, zero)
        if gw is not None:
            wb = gw if wb is None else gw + wb
        w_starts.append((wb, wb is not None and wb is not gw and wb is not gc))
        s_starts.append((gs, False))
        cw_owed.append(owed)
    # every layer's W̄, then every layer's S̄. Without a state, one buffer (at depth 2 both
    # layers' states hold D x hidden floats), zeroed by one launch where a cotangent is missing;
    # with one, separate tensors (the S̄ are returned, and outputs must not alias each other)
    shapes = [(N, H, w.shape[-2], w.shape[-1]) for w in weights]
    size = shapes[0][2] * shapes[0][3]
    firsts = w_starts + s_starts
    if has_state or any(sh[2] * sh[3] != size for sh in shapes):
        views = [torch.zeros(shapes[i % L], dtype=torch.float32, device=dev) if t is None
                 else t.contiguous() if fresh else t.clone(memory_format=torch.contiguous_format)
                 for i, (t, fresh) in enumerate(firsts)]
    else:
        bars = (torch.zeros if any(t is None for t, _ in firsts) else torch.empty)(
            2 * L, N, H, size, dtype=torch.float32, device=dev)
        views = [bars[i].view(shapes[i % L]) for i in range(2 * L)]
        for (t, _), view in zip(firsts, views):
            if t is not None:
                view.copy_(t)
    w_bar, s_bar = views[:L], views[L:]
    wg0 = [torch.empty(sh, dtype=torch.float32, device=dev) for sh in shapes]
    # the kernel writes every token's dq, dk, dv and gate gradients; packed rows past the last
    # sequence (cu_seqlens[-1] < total) are zeros
    alloc = torch.empty if cu_seqlens is None else torch.zeros
    dq, dk, dv = (alloc(B, T, H, D, dtype=q.dtype, device=dev) for _ in range(3))
    dgates = [alloc(B, T, H, dtype=torch.float32, device=dev) for _ in range(3)]
    # the LayerNorm parameters' gradient partials per (sequence, head, row of a chunk)
    n_ln = 0 if ln_weight is None else 1 if ln_bias is None else 2
    # the kernel's chunk: sub-chunks of the call's where it has no instance of its own
    Ck, R = bwd_chunking(D, C)
    dln = torch.zeros(n_ln, N, H, Ck, D, dtype=torch.float32, device=dev) if n_ln else None
    dln_w = dln[0] if n_ln else None
    dln_b = dln[1] if n_ln == 2 else None
    hidden = weights[0].shape[-1]
    per = _lib._C.neural_memory_chunked_bwd_scratch_floats(dim=D, hidden=hidden, depth=L,
                                                           chunk=Ck)
    scratch = torch.empty(N * H * per, dtype=torch.float32, device=dev)
    kept = bool(checkpoints) and checkpoint_every > 0
    # depth 1: every chunk's start state (the kernel recomputes none)
    K = 1 if L == 1 else int(checkpoint_every) if kept else max(1, int(FUSED_BWD_CHECKPOINT_EVERY))
    Kk = 1 if L == 1 else K * R  # the kernel's checkpoint interval, in its chunks
    ring = (torch.empty(N * H * (Kk - 1) * 4 * D * hidden, dtype=torch.float32, device=dev)
            if Kk > 1 else None)
    carry = ([torch.empty(N * H * D * hidden, dtype=torch.float32, device=dev) for _ in range(L)]
             if R > 1 else None)
    split = 1 if L == 1 else _bwd_plan(  # (depth 1: its launcher's cluster, no exchange here)
        N, H, D, hidden, Ck, KERNEL_DTYPES.index(q.dtype), int(FUSED_BWD_SPLIT),
        dev.index if dev.index is not None else torch.cuda.current_device())
    if split == 0:
        raise RuntimeError(f"titans_cuda: the fused backward cannot run split={FUSED_BWD_SPLIT} "
                           f"for {N} sequences x {H} heads on this device")
    xfloats = 0 if L == 1 else _lib._C.neural_memory_chunked_bwd_exchange_floats(
        dim=D, chunk=Ck, split=split)
    exchange = (torch.empty(N * H * xfloats, dtype=torch.float32, device=dev) if xfloats
                else None)
    # one counter per (sequence, head), each on a 128-byte line of its own
    arrivals = (torch.zeros(N * H * _lib._C.neural_memory_arrival_stride(), dtype=torch.int32,
                            device=dev) if xfloats else None)

    def bwd(ckpts):
        ckpts = list(checkpoints) if kept else ckpts
        ptrs = lambda ts: [0 if t is None else t.data_ptr() for t in ts]  # noqa: E731
        sub = dict(wg_carry=ptrs(carry)) if R > 1 else {}
        return dict(chunk=Ck, sub=R, ckpt_every=Kk, **sub,
                    bwd_ckpt_w=ptrs(ckpts[:L]), bwd_ckpt_s=ptrs(ckpts[L:2 * L]),
                    read_z2=ckpts[2 * L].data_ptr() if L == 2 else 0,
                    keys_fk=ckpts[2 * L + 1].data_ptr() if L == 2 else 0,
                    w_bar=ptrs(w_bar), s_bar=ptrs(s_bar), wg0_bar=ptrs(wg0), cw_bar=ptrs(cw_owed),
                    o_bar=g_o.data_ptr(), dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(),
                    dlr=dgates[0].data_ptr(), dforget=dgates[1].data_ptr(),
                    dmomentum=dgates[2].data_ptr(),
                    dln_w=0 if dln_w is None else dln_w.data_ptr(),
                    dln_b=0 if dln_b is None else dln_b.data_ptr(),
                    scratch=scratch.data_ptr(), split=int(FUSED_BWD_SPLIT),
                    ring=0 if ring is None else ring.data_ptr(),
                    exchange=0 if exchange is None else exchange.data_ptr(),
                    arrivals=0 if arrivals is None else arrivals.data_ptr())
    _launch(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
            state_momentum, state_chunk_weights, state_offset, chunk_size, activation,
            residual, ln_eps, read, cu_seqlens=cu_seqlens, kernel="chunked",
            checkpoint_every=0 if kept else K, bwd=bwd, run_forward=not kept)
    if has_state:
        open_chunk = (off > 0).view(N, 1, 1, 1)
        g_weights = [torch.zeros_like(w) for w in weights]
        g_state = ([(a + torch.where(open_chunk, zero, b)).to(t.dtype)
                    for a, b, t in zip(w_bar, wg0, state_weights)] +
                   [a.to(t.dtype) for a, t in zip(s_bar, state_momentum)] +
                   [torch.where(open_chunk, b, zero).to(t.dtype)
                    for b, t in zip(wg0, state_chunk_weights)])
    else:
        g_weights = [(a + b).sum(0).to(w.dtype) for a, b, w in zip(w_bar, wg0, weights)]
        g_state = []
    # (no output may alias another: the custom ops check)
    g_ln = [dln[i].sum((0, 2)).to(p.dtype) for i, p in enumerate((ln_weight, ln_bias)[:n_ln])]
    g_ln += [torch.zeros(H, D, dtype=torch.float32, device=dev) for _ in range(2 - n_ln)]
    out = [dq, dk, dv, dgates[0].to(lr.dtype), dgates[1].to(forget.dtype),
           dgates[2].to(momentum.dtype), *g_weights, *g_ln, *g_state]
    return [t.contiguous() for t in out]


def _fake_grads(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
                state_momentum, state_chunk_weights):
    H, D = q.shape[2], q.shape[3]
    ln = [torch.empty_like(t) if t is not None else q.new_empty(H, D, dtype=torch.float32)
          for t in (ln_weight, ln_bias)]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in
            (q, k, v, lr, forget, momentum, *weights)] + ln + [
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (*state_weights, *state_momentum, *state_chunk_weights)]


@torch.library.custom_op("titans_cuda::neural_memory_decode", mutates_args=())
def decode_op(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, forget: Tensor, momentum: Tensor,
              weights: List[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
              state_weights: List[Tensor], state_momentum: List[Tensor],
              state_chunk_weights: List[Tensor], state_offset: Optional[Tensor],
              chunk_size: int, activation: str, residual: bool, ln_eps: float,
              read: str) -> List[Tensor]:
    """[o, W per layer, S per layer, chunk weights per layer] after the call's tokens: o
    [N, T, H, D] (q's dtype), states [N, H, d_in, d_out] (fp32; the reference's compute dtype
    off the kernel path). The state lists are empty without an initial state."""
    args = (q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
            state_momentum, state_chunk_weights, state_offset, chunk_size, activation,
            residual, ln_eps, read)
    state = _state(state_weights, state_momentum, state_chunk_weights, state_offset)
    return _forward("decode", decode_reason(q, weights, None, state), args)


@decode_op.register_fake
def _(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
      state_momentum, state_chunk_weights, state_offset, chunk_size, activation, residual,
      ln_eps, read):
    return _fake(q, k, v, weights, state_weights, state_momentum, state_chunk_weights)


@torch.library.custom_op("titans_cuda::neural_memory_chunked", mutates_args=())
def chunked_op(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, forget: Tensor, momentum: Tensor,
               weights: List[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
               state_weights: List[Tensor], state_momentum: List[Tensor],
               state_chunk_weights: List[Tensor], state_offset: Optional[Tensor],
               chunk_size: int, activation: str, residual: bool, ln_eps: float, read: str,
               cu_seqlens: Optional[Tensor], checkpoint_every: int) -> List[Tensor]:
    """decode_op for any call, cu_seqlens included (then q, k, v are [1, total, H, D] and the
    states have one row per sequence), then 2 L + 2 more outputs: with ``checkpoint_every`` =
    K > 0 and the fused backward's shapes (chunked_bwd_reason), what the backward reads: the
    state at every K-th chunk start (W per layer, then S, each [n_ckpt, N, H, d_in, d_out],
    _checkpoint_shape), the read's z2 and the keys' fk (fp32 [B, T, H, D] each), else empty
    tensors."""
    args = (q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
            state_momentum, state_chunk_weights, state_offset, chunk_size, activation,
            residual, ln_eps, read)
    state = _state(state_weights, state_momentum, state_chunk_weights, state_offset)
    K = _kept_every(q, weights, chunk_size, cu_seqlens, state, read, checkpoint_every)
    outs = _forward("chunked", chunked_reason(q, weights, chunk_size, cu_seqlens, state), args,
                    cu_seqlens, checkpoint_every=K)
    if K == 0:
        outs = outs + [q.new_empty(0, dtype=torch.float32) for _ in range(2 * len(weights) + 2)]
    elif len(weights) == 1:  # no z2, fk at depth 1
        outs = outs + [q.new_empty(0, dtype=torch.float32) for _ in range(2)]
    return outs


@chunked_op.register_fake
def _(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
      state_momentum, state_chunk_weights, state_offset, chunk_size, activation, residual,
      ln_eps, read, cu_seqlens, checkpoint_every):
    state = _state(state_weights, state_momentum, state_chunk_weights, state_offset)
    K = _kept_every(q, weights, chunk_size, cu_seqlens, state, read, checkpoint_every)
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if K == 0:
        ckpts = [q.new_empty(0, dtype=torch.float32) for _ in range(2 * len(weights) + 2)]
    else:
        sub = (_ckpt_chunking(q.shape[-1], 1, int(chunk_size), q.dtype)[1]
               if len(weights) == 1 else 1)
        n_ckpt, = _checkpoint_shape(q.shape[1], chunk_size, K, bool(state_weights), sub)
        ckpts = [q.new_empty(n_ckpt, N, q.shape[2], w.shape[-2], w.shape[-1],
                             dtype=torch.float32) for _ in range(2) for w in weights]
        ckpts += [q.new_empty(q.shape if len(weights) == 2 else 0, dtype=torch.float32)
                  for _ in range(2)]  # z2, fk (none at depth 1)
    return _fake(q, k, v, weights, state_weights, state_momentum, state_chunk_weights,
                 cu_seqlens) + ckpts


@torch.library.custom_op("titans_cuda::neural_memory_decode_bwd", mutates_args=())
def decode_bwd_op(grads: List[Tensor], q: Tensor, k: Tensor, v: Tensor, lr: Tensor,
                  forget: Tensor, momentum: Tensor, weights: List[Tensor],
                  ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                  state_weights: List[Tensor], state_momentum: List[Tensor],
                  state_chunk_weights: List[Tensor], state_offset: Optional[Tensor],
                  chunk_size: int, activation: str, residual: bool, ln_eps: float,
                  read: str) -> List[Tensor]:
    """Gradients of decode_op's outputs against ``grads`` (one per output; an empty tensor
    stands for zeros, an output without a cotangent):
    [dq, dk, dv, dlr, dforget, dmomentum, dW per layer, d ln_weight, d ln_bias (zeros [H, D]
    when absent), d state weights, d state momentum, d state chunk weights (per layer, none
    without a state)]. The reference's VJP: an opaque op, so that traced backward graphs never
    see the reference's data-dependent handling of offsets."""
    return _reference_grads(grads, q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias,
                            state_weights, state_momentum, state_chunk_weights, state_offset,
                            chunk_size, activation, residual, ln_eps, read)


@decode_bwd_op.register_fake
def _(grads, q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
      state_momentum, state_chunk_weights, state_offset, chunk_size, activation, residual,
      ln_eps, read):
    return _fake_grads(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias,
                       state_weights, state_momentum, state_chunk_weights)


@torch.library.custom_op("titans_cuda::neural_memory_chunked_bwd", mutates_args=())
def chunked_bwd_op(grads: List[Tensor], q: Tensor, k: Tensor, v: Tensor, lr: Tensor,
                   forget: Tensor, momentum: Tensor, weights: List[Tensor],
                   ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                   state_weights: List[Tensor], state_momentum: List[Tensor],
                   state_chunk_weights: List[Tensor], state_offset: Optional[Tensor],
                   chunk_size: int, activation: str, residual: bool, ln_eps: float, read: str,
                   cu_seqlens: Optional[Tensor], checkpoint_every: int,
                   checkpoints: List[Tensor]) -> List[Tensor]:
    """decode_bwd_op for chunked_op, cu_seqlens included: the fused backward kernel where
    chunked_bwd_reason allows (on the forward's ``checkpoints`` when it kept them), else the
    reference's VJP."""
    state = _state(state_weights, state_momentum, state_chunk_weights, state_offset)
    args = (grads, q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
            state_momentum, state_chunk_weights, state_offset, chunk_size, activation, residual,
            ln_eps, read)
    return _chunked_grads(chunked_bwd_reason(q, weights, chunk_size, cu_seqlens, state, read),
                          args, cu_seqlens, checkpoints, checkpoint_every)


def _chunked_grads(bwd_reason, args, cu_seqlens, checkpoints, checkpoint_every) -> List[Tensor]:
    """chunked_op's gradients (``args``: _reference_grads' up to ``read``): the fused backward
    where ``bwd_reason`` is None, on the forward's ``checkpoints`` when it kept them all (K =
    ``checkpoint_every``), else the reference's VJP."""
    if bwd_reason is None:
        # the states, and at depth 2 z2 and fk (empty at depth 1)
        need = checkpoints if len(args[7]) == 2 else checkpoints[:2]
        kept = all(t.numel() > 0 for t in need) and len(need) > 0
        return _fused_grads(*args, cu_seqlens, checkpoints=checkpoints if kept else None,
                            checkpoint_every=checkpoint_every)
    return _reference_grads(*args, cu_seqlens)


@chunked_bwd_op.register_fake
def _(grads, q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, state_weights,
      state_momentum, state_chunk_weights, state_offset, chunk_size, activation, residual,
      ln_eps, read, cu_seqlens, checkpoint_every, checkpoints):
    return _fake_grads(q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias,
                       state_weights, state_momentum, state_chunk_weights)


def _setup_context(ctx, inputs, output):
    # outputs without a cotangent reach the backward as None, not as zeros of their shape
    # (the chunked op's kept checkpoints are as large as the forward's states times T / (C K))
    ctx.set_materialize_grads(False)
    L = len(inputs[6])
    extra = list(output[1 + 3 * L:])  # the chunked op's kept checkpoints (or empty tensors)
    ctx.save_for_backward(*inputs[:6], *inputs[6], *inputs[9], *inputs[10], *inputs[11],
                          *extra)
    ctx.rest = inputs[7], inputs[8], inputs[12:]
    ctx.counts = L, len(inputs[9])
    ctx.n_extra = len(extra)
    ctx.out_like = [(o.dtype, o.device) for o in output[:1 + 3 * L]]


def _layers(ts, L: int, n_state: int):
    """(weights, state weights, state momentum, state chunk weights) as lists, from the flat
    sequence ``ts`` that holds them in that order (L, then n_state each, then anything)."""
    return (list(ts[:L]), *(list(ts[L + i * n_state:L + (i + 1) * n_state]) for i in range(3)))


def _cotangents(grads, out_like):
    """An output without a cotangent (None) goes to the backward as an empty tensor: its zeros
    are made only where needed (the reference's VJP; no launch at all in the kernel's)."""
    return [g if g is not None else torch.empty(0, dtype=dtype, device=device)
            for g, (dtype, device) in zip(grads, out_like)]


def _make_backward(bwd_op):
    """The autograd formula of a forward op whose backward op is ``bwd_op`` (the same
    arguments, with the output gradients in front)."""
    def backward(ctx, grads):
        L, n_state = ctx.counts
        saved = ctx.saved_tensors
        weights, sw, sm, scw = _layers(saved[6:], L, n_state)
        ln_weight, ln_bias, trailing = ctx.rest
        grads = _cotangents(grads, ctx.out_like)
        extra = ([list(saved[len(saved) - ctx.n_extra:])] if ctx.n_extra else [])
        g = bwd_op(grads, *saved[:6], weights, ln_weight, ln_bias, sw, sm, scw, *trailing,
                   *extra)
        g_ws, g_ln, g_st = g[6:6 + L], g[6 + L:8 + L], g[8 + L:]
        return (*g[:6], g_ws, g_ln[0] if ln_weight is not None else None,
                g_ln[1] if ln_bias is not None else None, g_st[:n_state],
                g_st[n_state:2 * n_state], g_st[2 * n_state:], *([None] * len(trailing)))
    return backward


decode_op.register_autograd(_make_backward(decode_bwd_op), setup_context=_setup_context)
chunked_op.register_autograd(_make_backward(chunked_bwd_op), setup_context=_setup_context)


# Eager calls on plain CUDA tensors skip the dispatcher and custom_op's autograd layer: a
# torch.autograd.Function calls the ops' own implementations (_forward, _fused_grads,
# _reference_grads), so the results are the ops' results. That layer (argument flattening,
# schema checks, two dispatches per op) took about half the host time of a short call
# (docs/perf_notes.md, v18). Under torch.compile, a dispatch mode (FakeTensor, ...), a torch.func
# transform or for tensor subclasses the ops run as registered. TITANS_EAGER_DIRECT=0 always
# takes the ops (an A/B switch).
EAGER_DIRECT = os.environ.get("TITANS_EAGER_DIRECT", "1") != "0"
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _direct(tensors) -> bool:
    """Whether this call may take the implementations directly (_Direct)."""
    if not EAGER_DIRECT or torch.compiler.is_compiling():
        return False
    if _get_current_dispatch_mode() is not None or \
            torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


class _Direct(torch.autograd.Function):
    """decode_op / chunked_op with their autograd formula, minus the dispatcher. apply(call,
    q, k, v, lr, forget, momentum, ln_weight, ln_bias, *weights, *state weights, *state
    momentum, *state chunk weights) -> (o, W per layer, S per layer, chunk weights per layer).
    ``call``: (kernel, forward reason, backward reason, L, n_state, state_offset, chunk_size,
    activation, residual, ln_eps, read, cu_seqlens, K), K the kept checkpoints' interval."""

    @staticmethod
    def forward(ctx, call, q, k, v, lr, forget, momentum, ln_weight, ln_bias, *lists):
        kernel, reason, _, L, n_state, state_offset, *opts, cu_seqlens, K = call
        weights, sw, sm, scw = _layers(lists, L, n_state)
        args = (q, k, v, lr, forget, momentum, weights, ln_weight, ln_bias, sw, sm, scw,
                state_offset, *opts)
        outs = _forward(kernel, reason, args, cu_seqlens, checkpoint_every=K)
        n = 1 + 3 * L
        ctx.set_materialize_grads(False)
        ctx.call = call
        ctx.out_like = [(o.dtype, o.device) for o in outs[:n]]
        ctx.save_for_backward(q, k, v, lr, forget, momentum, ln_weight, ln_bias, *lists,
                              *outs[n:])  # the kept checkpoints (chunked, K > 0)
        return tuple(outs[:n])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        kernel, _, bwd_reason, L, n_state, state_offset, *opts, cu_seqlens, K = ctx.call
        saved = ctx.saved_tensors
        q, k, v, lr, forget, momentum, ln_weight, ln_bias = saved[:8]
        weights, sw, sm, scw = _layers(saved[8:], L, n_state)
        args = (_cotangents(grads, ctx.out_like), q, k, v, lr, forget, momentum, weights,
                ln_weight, ln_bias, sw, sm, scw, state_offset, *opts)
        if kernel == "chunked":  # on the kept checkpoints, saved last (none when K = 0)
            g = _chunked_grads(bwd_reason, args, cu_seqlens, list(saved[8 + L + 3 * n_state:]),
                               K)
        else:  # the decode op's backward: the reference's VJP
            g = _reference_grads(*args, cu_seqlens)
        g_ln = g[6 + L:8 + L]
        return (None, *g[:6], g_ln[0] if ln_weight is not None else None,
                g_ln[1] if ln_bias is not None else None, *g[6:6 + L], *g[8 + L:])


def fused(q, k, v, lr, forget, momentum, weights, *, chunk_size, activation, residual,
          ln_weight, ln_bias, ln_eps, read, initial_state, cu_seqlens=None, kernel="decode",
          reason=_UNSET):
    """neural_memory through decode_op (kernel="decode") or chunked_op: (o, MemoryState).
    ``reason``: this call's decode_reason / chunked_reason when the caller has it (None: the
    kernel runs); eager calls hand it to the implementations directly (_Direct)."""
    st = initial_state
    sw, sm, scw = (([], [], []) if st is None else
                   (list(st.weights), list(st.momentum), list(st.chunk_weights)))
    offset = None if st is None else st.offset
    args = (q, k, v, lr, forget, momentum, list(weights), ln_weight, ln_bias, sw, sm, scw,
            offset, chunk_size, activation, residual, ln_eps, read)
    tensors = [q, k, v, lr, forget, momentum, *weights, ln_weight, ln_bias, *sw, *sm, *scw]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    L = len(weights)
    if _direct(tensors):
        if reason is _UNSET:
            reason = (decode_reason(q, weights, None, st) if kernel == "decode" else
                      chunked_reason(q, weights, chunk_size, cu_seqlens, st))
        if not grad:  # no autograd graph: the forward alone
            outs = _forward(kernel, reason, args, cu_seqlens)
        else:
            bwd_reason = None  # the decode op's backward is the reference's VJP
            if kernel == "chunked":
                bwd_reason = chunked_bwd_reason(q, weights, chunk_size, cu_seqlens, st, read,
                                                fwd_reason=reason)
            K = (_kept_every(q, weights, chunk_size, cu_seqlens, st, read,
                             FUSED_BWD_CHECKPOINT_EVERY, bwd_reason=bwd_reason)
                 if kernel == "chunked" else 0)
            call = (kernel, reason, bwd_reason, L, len(sw), offset, chunk_size, activation,
                    residual, ln_eps, read, cu_seqlens, K)
            outs = _Direct.apply(call, q, k, v, lr, forget, momentum, ln_weight, ln_bias,
                                 *weights, *sw, *sm, *scw)
    elif kernel == "decode":
        outs = decode_op(*args)
    else:  # keep the fused backward's checkpoints when a backward can follow
        outs = chunked_op(*args, cu_seqlens, FUSED_BWD_CHECKPOINT_EVERY if grad else 0)
    if cu_seqlens is None and offset is None:  # one launch
        final_offset = torch.full((q.shape[0],), q.shape[1] % int(chunk_size), dtype=torch.int64,
                                  device=q.device)
    else:
        _, final_offset = _offsets(q, cu_seqlens, offset, chunk_size)
    if not torch.compiler.is_compiling():
        own_offset(final_offset, chunk_size)
    return outs[0], MemoryState(tuple(outs[1:1 + L]), tuple(outs[1 + L:1 + 2 * L]),
                                tuple(outs[1 + 2 * L:1 + 3 * L]), final_offset)


def decode(q, k, v, lr, forget, momentum, weights, **kw):
    """neural_memory through the decode op: (o, MemoryState)."""
    return fused(q, k, v, lr, forget, momentum, weights, kernel="decode", **kw)
