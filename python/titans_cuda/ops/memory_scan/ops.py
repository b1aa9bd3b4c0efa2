"""The memory_scan custom op: ``torch.ops.titans_cuda.memory_scan`` (one memory layer).

Registered as a set (custom_op + register_fake + register_autograd) so that autograd,
torch.compile and CUDA graphs see one opaque, well-described op. On CUDA float32 inputs with
the extension loaded it runs the kernel; elsewhere (CPU, float64) the reference scan, which is
what opcheck exercises on machines without a GPU. The backward is the reverse scan of
reference.scan_backward (a kernel for it is the next issue's work).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _lib
from .reference import scan_backward, scan_forward

OP_NAME = "titans_cuda::memory_scan"


def _kernel_ok(updates: Tensor) -> bool:
    return (updates.is_cuda and updates.dtype == torch.float32
            and _lib.kernels_unavailable_reason(updates.device) is None)


def launch(updates, forget, momentum, w0, s0, out=None):
    """Runs the kernel. ``out``: optional (W_all, S_last) contiguous float32 tensors to write
    into (the tests pass NaN-poisoned ones to prove every element is written)."""
    B, H, n_chunks, E = updates.shape
    if updates.stride(-1) != 1:
        updates = updates.contiguous()
    forget = forget.to(torch.float32)
    momentum = momentum.to(torch.float32)
    w0 = w0.to(torch.float32)
    if w0.stride(-1) != 1:
        w0 = w0.contiguous()
    if s0 is not None:
        s0 = s0.to(torch.float32)
        if s0.stride(-1) != 1:
            s0 = s0.contiguous()
    if out is None:
        out = (torch.empty(B, H, n_chunks, E, dtype=torch.float32, device=updates.device),
               torch.empty(B, H, E, dtype=torch.float32, device=updates.device))
    w_all, s_last = out
    if not (w_all.is_contiguous() and s_last.is_contiguous()):
        raise ValueError("memory_scan outputs must be contiguous")
    _lib._C.memory_scan_fwd(
        updates=updates.data_ptr(), updates_b_stride=updates.stride(0),
        updates_h_stride=updates.stride(1), updates_c_stride=updates.stride(2),
        forget=forget.data_ptr(), forget_b_stride=forget.stride(0),
        forget_c_stride=forget.stride(1), forget_h_stride=forget.stride(2),
        momentum=momentum.data_ptr(), momentum_b_stride=momentum.stride(0),
        momentum_c_stride=momentum.stride(1), momentum_h_stride=momentum.stride(2),
        initial_weights=w0.data_ptr(), initial_weights_b_stride=w0.stride(0),
        initial_weights_h_stride=w0.stride(1),
        initial_momentum=0 if s0 is None else s0.data_ptr(),
        initial_momentum_b_stride=0 if s0 is None else s0.stride(0),
        initial_momentum_h_stride=0 if s0 is None else s0.stride(1),
        weights_out=w_all.data_ptr(), momentum_out=s_last.data_ptr(),
        batch=B, heads=H, n_chunks=n_chunks, elements=E,
        stream=_lib.stream_handle(updates.device), device=updates.device.index)
    return w_all, s_last


@torch.library.custom_op(OP_NAME, mutates_args=())
def memory_scan_op(updates: Tensor, forget: Tensor, momentum: Tensor, initial_weights: Tensor,
                   initial_momentum: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """updates [B, H, NC, E]; forget, momentum [B, NC, H]; initial_weights [B, H, E] (may be a
    stride-0 broadcast); initial_momentum [B, H, E] or None.
    Returns W_all [B, H, NC, E] and S_last [B, H, E]."""
    if _kernel_ok(updates):
        return launch(updates, forget, momentum, initial_weights, initial_momentum)
    w_all, s_last = scan_forward(updates, forget, momentum, initial_weights, initial_momentum)
    return w_all.contiguous(), s_last.contiguous().clone()


@memory_scan_op.register_fake
def _(updates, forget, momentum, initial_weights, initial_momentum):
    B, H, n_chunks, E = updates.shape
    return updates.new_empty(B, H, n_chunks, E), updates.new_empty(B, H, E)


def _setup_context(ctx, inputs, output):
    updates, forget, momentum, initial_weights, initial_momentum = inputs
    w_all, _ = output
    ctx.has_s0 = initial_momentum is not None
    saved = [updates, forget, momentum, initial_weights, w_all]
    if ctx.has_s0:
        saved.append(initial_momentum)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_w_all, grad_s_last):
    updates, forget, momentum, initial_weights, w_all, *rest = ctx.saved_tensors
    initial_momentum = rest[0] if ctx.has_s0 else None
    d_updates, d_forget, d_momentum, d_w0, d_s0 = scan_backward(
        grad_w_all, grad_s_last, updates, forget, momentum, initial_weights, initial_momentum,
        w_all)
    return d_updates, d_forget, d_momentum, d_w0.to(initial_weights.dtype), d_s0


memory_scan_op.register_autograd(_backward, setup_context=_setup_context)
