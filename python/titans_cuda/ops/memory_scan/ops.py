"""The memory_scan custom op: ``torch.ops.titans_cuda.memory_scan`` (one memory layer).

Registered as a set (custom_op + register_fake + register_autograd) so that autograd,
torch.compile and CUDA graphs see one opaque, well-described op. On CUDA float32 inputs with
the extension loaded it runs the kernel; elsewhere (CPU, float64) the reference scan, which is
what opcheck exercises on machines without a GPU. Its backward is a second custom op,
``torch.ops.titans_cuda.memory_scan_bwd`` (the reverse-scan kernel, or reference.scan_backward
off the kernel path), so that torch.compile traces the backward too.
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


def _kernel_inputs(updates, forget, momentum, w0, s0):
    """What the kernels read: fp32, the E axis contiguous (other strides are passed)."""
    def inner_contiguous(t):
        t = t.to(torch.float32)
        return t if t.stride(-1) == 1 else t.contiguous()
    return (inner_contiguous(updates), forget.to(torch.float32), momentum.to(torch.float32),
            inner_contiguous(w0), None if s0 is None else inner_contiguous(s0))


def _strides(updates, forget, momentum, w0, s0):
    return dict(
        updates_b_stride=updates.stride(0), updates_h_stride=updates.stride(1),
        updates_c_stride=updates.stride(2),
        forget=forget.data_ptr(), forget_b_stride=forget.stride(0),
        forget_c_stride=forget.stride(1), forget_h_stride=forget.stride(2),
        momentum=momentum.data_ptr(), momentum_b_stride=momentum.stride(0),
        momentum_c_stride=momentum.stride(1), momentum_h_stride=momentum.stride(2),
        initial_weights=w0.data_ptr(), initial_weights_b_stride=w0.stride(0),
        initial_weights_h_stride=w0.stride(1),
        initial_momentum=0 if s0 is None else s0.data_ptr(),
        initial_momentum_b_stride=0 if s0 is None else s0.stride(0),
        initial_momentum_h_stride=0 if s0 is None else s0.stride(1),
        stream=_lib.stream_handle(updates.device), device=updates.device.index)


def launch(updates, forget, momentum, w0, s0, out=None):
    """Runs the forward kernel. ``out``: optional (W_all, S_last) contiguous float32 tensors to
    write into (the tests pass NaN-poisoned ones to prove every element is written)."""
    B, H, n_chunks, E = updates.shape
    updates, forget, momentum, w0, s0 = _kernel_inputs(updates, forget, momentum, w0, s0)
    if out is None:
        out = (torch.empty(B, H, n_chunks, E, dtype=torch.float32, device=updates.device),
               torch.empty(B, H, E, dtype=torch.float32, device=updates.device))
    w_all, s_last = out
    if not (w_all.is_contiguous() and s_last.is_contiguous()):
        raise ValueError("memory_scan outputs must be contiguous")
    _lib._C.memory_scan_fwd(updates=updates.data_ptr(), weights_out=w_all.data_ptr(),
                            momentum_out=s_last.data_ptr(), batch=B, heads=H, n_chunks=n_chunks,
                            elements=E, **_strides(updates, forget, momentum, w0, s0))
    return w_all, s_last


def launch_backward(grad_w_all, grad_s_last, updates, forget, momentum, w0, s0, w_all,
                    out=None):
    """Runs the reverse-scan kernel; returns (dU, d forget, d momentum, dW0, dS0 or None).
    ``out``: optional preallocated outputs in that order (dS0 None when s0 is None)."""
    B, H, n_chunks, E = updates.shape
    dev = updates.device
    updates, forget, momentum, w0, s0 = _kernel_inputs(updates, forget, momentum, w0, s0)
    grad_w_all = grad_w_all.to(torch.float32).contiguous()
    grad_s_last = grad_s_last.to(torch.float32).contiguous()
    w_all = w_all.to(torch.float32).contiguous()
    if out is None:
        f32 = dict(dtype=torch.float32, device=dev)
        out = (torch.empty(B, H, n_chunks, E, **f32), torch.empty(B, n_chunks, H, **f32),
               torch.empty(B, n_chunks, H, **f32), torch.empty(B, H, E, **f32),
               None if s0 is None else torch.empty(B, H, E, **f32))
    if not all(t is None or t.is_contiguous() for t in out):
        raise ValueError("memory_scan backward outputs must be contiguous")
    d_u, d_forget, d_eta, d_w0, d_s0 = out
    scratch = _lib._C.memory_scan_bwd_scratch(batch=B, heads=H, n_chunks=n_chunks, elements=E)
    checkpoints = torch.empty(scratch["checkpoints"], dtype=torch.float32, device=dev)
    partials = torch.empty(scratch["gate_partials"], dtype=torch.float32, device=dev)
    _lib._C.memory_scan_bwd(
        grad_weights=grad_w_all.data_ptr(), grad_momentum=grad_s_last.data_ptr(),
        updates=updates.data_ptr(), weights=w_all.data_ptr(), grad_updates=d_u.data_ptr(),
        grad_forget=d_forget.data_ptr(), grad_momentum_gate=d_eta.data_ptr(),
        grad_initial_weights=d_w0.data_ptr(),
        grad_initial_momentum=0 if d_s0 is None else d_s0.data_ptr(),
        checkpoints=checkpoints.data_ptr(), gate_partials=partials.data_ptr(),
        batch=B, heads=H, n_chunks=n_chunks, elements=E,
        **_strides(updates, forget, momentum, w0, s0))
    return d_u, d_forget, d_eta, d_w0, d_s0


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


@torch.library.custom_op(OP_NAME + "_bwd", mutates_args=())
def memory_scan_bwd_op(grad_w_all: Tensor, grad_s_last: Tensor, updates: Tensor,
                       forget: Tensor, momentum: Tensor, initial_weights: Tensor,
                       initial_momentum: Optional[Tensor], w_all: Tensor
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reverse scan: (dU [B, H, NC, E], d forget [B, NC, H], d momentum [B, NC, H],
    dW0 [B, H, E], dS0 [B, H, E] (zeros when initial_momentum is None))."""
    if _kernel_ok(updates):
        d_u, d_f, d_m, d_w0, d_s0 = launch_backward(grad_w_all, grad_s_last, updates, forget,
                                                    momentum, initial_weights, initial_momentum,
                                                    w_all)
    else:
        d_u, d_f, d_m, d_w0, d_s0 = scan_backward(grad_w_all, grad_s_last, updates, forget,
                                                  momentum, initial_weights, initial_momentum,
                                                  w_all)
        # contiguous like the kernel's (and the fake's) outputs, and never an input's alias
        d_u, d_f, d_m = d_u.contiguous(), d_f.contiguous(), d_m.contiguous()
        d_w0 = d_w0.contiguous().clone()
    if d_s0 is None:
        d_s0 = d_w0.new_zeros(d_w0.shape)
    return (d_u, d_f.to(forget.dtype), d_m.to(momentum.dtype), d_w0.to(initial_weights.dtype),
            d_s0)


@memory_scan_bwd_op.register_fake
def _(grad_w_all, grad_s_last, updates, forget, momentum, initial_weights, initial_momentum,
      w_all):
    B, H, n_chunks, E = updates.shape
    return (updates.new_empty(B, H, n_chunks, E), forget.new_empty(B, n_chunks, H),
            momentum.new_empty(B, n_chunks, H), initial_weights.new_empty(B, H, E),
            updates.new_empty(B, H, E))


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
    if grad_w_all is None:
        grad_w_all = torch.zeros_like(w_all)
    if grad_s_last is None:
        grad_s_last = updates.new_zeros(initial_weights.shape)
    d_u, d_f, d_m, d_w0, d_s0 = memory_scan_bwd_op(grad_w_all, grad_s_last, updates, forget,
                                                    momentum, initial_weights, initial_momentum,
                                                    w_all)
    return d_u, d_f, d_m, d_w0, (d_s0 if ctx.has_s0 else None)


memory_scan_op.register_autograd(_backward, setup_context=_setup_context)
