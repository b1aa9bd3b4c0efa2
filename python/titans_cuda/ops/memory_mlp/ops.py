"""Custom ops over the memory-MLP tile kernel (csrc/memory_mlp):

  titans_cuda::memory_forward      y = M_W(x)                          (kernel mode kForward)
  titans_cuda::memory_forward_bwd  dx, dW, d ln_weight, d ln_bias       (kernel mode kBackward)
  titans_cuda::memory_grad         U_j per chunk                        (kernel mode kGrad)
  titans_cuda::memory_grad_bwd     the second-order terms of memory_grad  (mode kGradBackward)

Each op runs the kernel on CUDA bf16/fp16/fp32 inputs of a supported shape (``kernel_reason``
is None) and the reference otherwise, so opcheck and the CPU tests exercise the same ops.
bf16/fp16 inputs take one tensor-core product in their own type; fp32 inputs keep fp32 operands
and take split TF32 products (3xTF32, fp32-level accuracy: SPEC §7's 1e-5), never plain TF32.
Weights are a list of one (depth 1) or two (depth 2) fp32 tensors laid out as
[H | B, H | B, H, NC, d_in, d_out]; chunk_size matters to memory_forward only for the last.
The kernel writes per-tile sums; the tile axis is summed here (torch.sum: fixed order).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ... import _lib
from ..activations import ACTIVATIONS
from . import reference as ref

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # MlpDtype's order
KERNEL_DIMS = (16, 32, 64, 128)
TILE_ROWS = 64  # kMlpTileRows in memory_mlp.h (a test checks they agree)
_MODE = {"forward": 0, "grad": 1, "backward": 2, "grad_backward": 3}


def shape_supported(dim: int, hidden: int, depth: int) -> bool:
    """The rule of memory_mlp_supported (memory_mlp.h), in Python so that torch.compile
    traces it; a test checks it against the extension's."""
    return dim in KERNEL_DIMS and (depth == 1 or (depth == 2 and hidden >= 16
                                                  and hidden % 16 == 0))


@functools.lru_cache(maxsize=None)
def _smem_bytes(dtype: torch.dtype, dim: int, hidden: int, depth: int, mode: str) -> int:
    return _lib._C.memory_mlp_smem_bytes(KERNEL_DTYPES.index(dtype), dim, hidden, depth,
                                         _MODE[mode])


def _smem_reason(x: Tensor, hidden: int, depth: int, second_order: bool) -> Optional[str]:
    """Why the kernels' shared memory does not fit this GPU (None when it does). The custom ops
    ask this eagerly; under torch.compile tracing the answer is left to them."""
    if torch.compiler.is_compiling():
        return None
    B, T, H, D = x.shape
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    limit = _lib.smem_per_block_optin(index)
    modes = ("forward", "grad_backward") if second_order else ("forward",)
    need = max(_smem_bytes(x.dtype, D, hidden, depth, m) for m in modes)
    if need > limit:
        return (f"the memory-MLP kernel for D={D}, hidden={hidden}, depth={depth}, {x.dtype} "
                f"needs {need // 1024} KiB of shared memory per block; cuda:{index} allows "
                f"{limit // 1024} KiB")
    return None


def kernel_reason(x: Tensor, weights, second_order: bool = False) -> Optional[str]:
    """None when the tile kernel handles this call, else why not (for warnings and errors).
    ``second_order``: also the kernel of memory_grad's backward (memory_grad calls)."""
    if not x.is_cuda:
        return "the inputs are not on a CUDA device"
    reason = _lib.kernels_unavailable_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in KERNEL_DTYPES:
        return (f"the memory-MLP kernels take bf16/fp16/fp32 inputs; {x.dtype} inputs run on "
                f"the reference")
    if any(w.dtype != torch.float32 for w in weights):
        return "the memory-MLP kernels take float32 weights"
    B, T, H, D = x.shape
    depth = len(weights)
    hidden = weights[0].shape[-1]
    if not shape_supported(D, hidden, depth):
        return (f"no memory-MLP kernel for D={D}, hidden={hidden}, depth={depth} (supported: D in "
                f"{KERNEL_DIMS}, depth 1, or depth 2 with hidden a multiple of 16)")
    if T == 0 or B > 65535 or H > 65535:
        return f"no memory-MLP kernel for B={B}, T={T}, H={H}"
    return _smem_reason(x, hidden if depth == 2 else D, depth, second_order)


def _rows(t: Tensor) -> Tensor:
    """[B, T, H, D] with D contiguous and 16-byte aligned rows (what the kernel reads)."""
    vec = 16 // t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(s % vec == 0 for s in t.stride()[:-1]))
    return t if ok else t.contiguous()


def _weight_strides(w: Tensor):
    """(tensor, b, h, chunk strides) of a weight [H | B,H | B,H,NC, d_in, d_out], inner dims
    contiguous (16-byte aligned)."""
    if not (w.stride(-1) == 1 and w.stride(-2) == w.shape[-1] and w.data_ptr() % 16 == 0):
        w = w.contiguous()
    if w.dim() == 3:
        return w, 0, w.stride(0), 0
    if w.dim() == 4:
        return w, w.stride(0), w.stride(1), 0
    return w, w.stride(0), w.stride(1), w.stride(2)


def _tiling(T: int, chunk: int):
    n_chunks = -(-T // chunk)
    n_sub = -(-min(chunk, T) // TILE_ROWS)
    return n_chunks, n_sub


def _launch(mode: str, x: Tensor, weights: List[Tensor], chunk: int,
            activation: str, residual: bool, ln_weight, ln_bias, ln_eps: float, *, v=None,
            lr=None, grad_y=None, grad_u=None, first_weights=None,
            out: Optional[dict] = None) -> dict:
    """Runs the kernel; returns the raw outputs by name: y (forward); u1, u2 (U, or dW per
    tile); grad_x, grad_v, grad_lr; grad_ln per tile. ``out``: preallocated outputs by name
    (the tests pass NaN-poisoned ones). ``first_weights``: the shifted read (memory_mlp.h):
    chunk c uses weights[:, :, c - 1], chunk 0 first_weights; a backward then also returns
    u1_first / u2_first [B, H, n_sub, ...] and leaves the last chunk's slot of u1 / u2 zero."""
    B, T, H, D = x.shape
    x = _rows(x)
    depth = len(weights)
    hidden = weights[0].shape[-1] if depth == 2 else D
    n_chunks, n_sub = _tiling(T, chunk)
    n_tiles = n_chunks * n_sub
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    out = dict(out or {})
    args = dict(x=x.data_ptr(), x_b_stride=x.stride(0), x_t_stride=x.stride(1),
                x_h_stride=x.stride(2), v=0, v_b_stride=0, v_t_stride=0, v_h_stride=0,
                lr=0, lr_b_stride=0, lr_t_stride=0, lr_h_stride=0, grad_y=0,
                grad_y_b_stride=0, grad_y_t_stride=0, grad_y_h_stride=0,
                y=0, grad_x=0, grad_v=0, grad_lr=0, grad_u1=0, grad_u2=0, u1=0, u2=0,
                grad_ln=0)
    keep = [x]
    for i, w in enumerate(weights):
        w, sb, sh, sc = _weight_strides(w.to(torch.float32))
        keep.append(w)
        args.update({f"w{i + 1}": w.data_ptr(), f"w{i + 1}_b_stride": sb,
                     f"w{i + 1}_h_stride": sh, f"w{i + 1}_c_stride": sc})
    if depth == 1:
        args.update(w2=0, w2_b_stride=0, w2_h_stride=0, w2_c_stride=0)
    args.update(shifted=first_weights is not None, w1_first=0, w1_first_b_stride=0,
                w1_first_h_stride=0, w2_first=0, w2_first_b_stride=0, w2_first_h_stride=0,
                u1_first=0, u2_first=0)
    for i, w in enumerate(first_weights or ()):
        w, sb, sh, _ = _weight_strides(w.to(torch.float32))
        keep.append(w)
        args.update({f"w{i + 1}_first": w.data_ptr(), f"w{i + 1}_first_b_stride": sb,
                     f"w{i + 1}_first_h_stride": sh})
    ln_w = None if ln_weight is None else ln_weight.to(torch.float32).contiguous()
    ln_b = None if ln_bias is None or ln_w is None else ln_bias.to(torch.float32).contiguous()
    keep += [t for t in (ln_w, ln_b) if t is not None]
    args.update(ln_weight=0 if ln_w is None else ln_w.data_ptr(),
                ln_bias=0 if ln_b is None else ln_b.data_ptr(), ln_eps=float(ln_eps))
    if mode == "forward":
        out.setdefault("y", torch.empty(B, T, H, D, dtype=x.dtype, device=dev))
        args["y"] = out["y"].data_ptr()
    else:
        shapes = [(D, hidden), (hidden, D)][:depth]
        for i, shape in enumerate(shapes):
            name = f"u{i + 1}"
            out.setdefault(name, torch.empty(B, H, n_tiles, *shape, **f32))
            args[name] = out[name].data_ptr()
            if first_weights is not None:
                out[name][:, :, n_tiles - n_sub:].zero_()  # W_NC reads nothing
                out.setdefault(name + "_first", torch.empty(B, H, n_sub, *shape, **f32))
                args[name + "_first"] = out[name + "_first"].data_ptr()
    if mode in ("grad", "grad_backward"):
        v = _rows(v.to(x.dtype))
        lr = lr.to(torch.float32)
        keep += [v, lr]
        args.update(v=v.data_ptr(), v_b_stride=v.stride(0), v_t_stride=v.stride(1),
                    v_h_stride=v.stride(2), lr=lr.data_ptr(), lr_b_stride=lr.stride(0),
                    lr_t_stride=lr.stride(1), lr_h_stride=lr.stride(2))
    if mode == "backward":
        grad_y = _rows(grad_y.to(x.dtype))
        keep.append(grad_y)
        args.update(grad_y=grad_y.data_ptr(), grad_y_b_stride=grad_y.stride(0),
                    grad_y_t_stride=grad_y.stride(1), grad_y_h_stride=grad_y.stride(2))
    if mode == "grad_backward":
        grad_u = [g.to(torch.float32).contiguous() for g in grad_u]
        keep += grad_u
        args.update({f"grad_u{i + 1}": g.data_ptr() for i, g in enumerate(grad_u)})
        out.setdefault("grad_v", torch.empty(B, T, H, D, dtype=x.dtype, device=dev))
        out.setdefault("grad_lr", torch.empty(B, T, H, **f32))
        args.update(grad_v=out["grad_v"].data_ptr(), grad_lr=out["grad_lr"].data_ptr())
    if mode in ("backward", "grad_backward"):
        out.setdefault("grad_x", torch.empty(B, T, H, D, dtype=x.dtype, device=dev))
        args["grad_x"] = out["grad_x"].data_ptr()
        if ln_w is not None:
            out.setdefault("grad_ln", torch.empty(B, H, n_tiles, 2, D, **f32))
            args["grad_ln"] = out["grad_ln"].data_ptr()
    if not all(t.is_contiguous() for t in out.values()):
        raise ValueError("memory_mlp outputs must be contiguous")
    args.update(batch=B, heads=H, seqlen=T, dim=D, hidden=hidden, depth=depth, chunk=chunk,
                n_chunks=n_chunks, n_sub=n_sub, activation=ACTIVATIONS.index(activation),
                residual=bool(residual), mode=_MODE[mode],
                dtype=KERNEL_DTYPES.index(x.dtype), stream=_lib.stream_handle(dev),
                device=dev.index)
    _lib._C.memory_mlp(args)
    out["n_chunks"], out["n_sub"] = n_chunks, n_sub
    return out


def _sum_tiles(u: Tensor, n_chunks: int, n_sub: int, lead: int) -> Tensor:
    """Per-tile sums [B, H, n_tiles, a, b] -> the weight layout of ``lead`` leading dims:
    [B, H, NC, ...] (3), [B, H, ...] (2) or [H, ...] (1)."""
    B, H, _, a, b = u.shape
    u = u.view(B, H, n_chunks, n_sub, a, b)
    if lead == 3:
        return u[:, :, :, 0] if n_sub == 1 else u.sum(3)
    u = u.sum((2, 3))
    return u.sum(0) if lead == 1 else u


def _ln_grads(o: dict, ln_weight, ln_bias, H: int, D: int, device):
    """(d ln_weight, d ln_bias) [H, D] from the kernel's per-tile partials (zeros when absent),
    in the parameters' dtypes (float32 when absent)."""
    gamma_dtype = torch.float32 if ln_weight is None else ln_weight.dtype
    beta_dtype = torch.float32 if ln_bias is None else ln_bias.dtype
    d_gamma = torch.zeros(H, D, dtype=gamma_dtype, device=device)
    d_beta = torch.zeros(H, D, dtype=beta_dtype, device=device)
    if ln_weight is not None:
        d_ln = o["grad_ln"].sum((0, 2))
        d_gamma = d_ln[:, 0].to(gamma_dtype).contiguous()
        if ln_bias is not None:
            d_beta = d_ln[:, 1].to(beta_dtype).contiguous()
    return d_gamma, d_beta


def _ln_grads_or_zeros(d_gamma, d_beta, H: int, D: int, device):
    """The reference VJP's LN gradients (None for an absent parameter -> float32 zeros, as the
    ops' schemas return), contiguous."""
    zeros = lambda: torch.zeros(H, D, dtype=torch.float32, device=device)  # noqa: E731
    return ((zeros() if d_gamma is None else d_gamma.contiguous()),
            (zeros() if d_beta is None else d_beta.contiguous()))


def _chunk_for(T: int, chunk_size: Optional[int], weights) -> int:
    """Tokens per kernel chunk: the weights' chunk when they are per chunk, else one chunk."""
    return chunk_size if weights[0].dim() == 5 else max(T, 1)


# ------------------------------------------------------------------------------------------
# memory_forward
# ------------------------------------------------------------------------------------------

def _shifted_weights(weights, first_weights):
    """The weights chunk j reads in the shifted layout: first_weights for j = 0, weights[j - 1]
    after (the parallel variant's W_{j-1}), as concatenated per-chunk tensors."""
    out = []
    for w, w0 in zip(weights, first_weights):
        B, H = w.shape[:2]
        w0 = w0.to(w.dtype).expand(B, H, *w0.shape[-2:]).unsqueeze(2)
        out.append(torch.cat([w0, w[:, :, :-1]], dim=2))
    return out


def _forward_reference(x, weights, ln_weight, ln_bias, chunk_size, activation, residual,
                       ln_eps, first_weights=None):
    if first_weights is not None:
        weights = _shifted_weights(weights, first_weights)
    return ref.memory_forward(x, weights, chunk_size=chunk_size, activation=activation,
                              residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                              ln_eps=ln_eps)


@torch.library.custom_op("titans_cuda::memory_forward", mutates_args=())
def memory_forward_op(x: Tensor, weights: List[Tensor], ln_weight: Optional[Tensor],
                      ln_bias: Optional[Tensor], chunk_size: Optional[int],
                      activation: str, residual: bool, ln_eps: float,
                      first_weights: List[Tensor]) -> Tensor:
    """y [B, T, H, D] (x's dtype) = M_W(x); weights as the module docstring says. With
    ``first_weights`` ([H | B, H, d_in, d_out] per layer) the weights are per chunk and chunk j
    reads weights[:, :, j - 1], chunk 0 first_weights (the parallel variant's read, without
    concatenating); an empty list means none."""
    firsts = list(first_weights) or None
    if kernel_reason(x, weights) is None:
        chunk = _chunk_for(x.shape[1], chunk_size, weights)
        return _launch("forward", x, weights, chunk, activation, residual, ln_weight,
                       ln_bias, ln_eps, first_weights=firsts)["y"]
    return _forward_reference(x, weights, ln_weight, ln_bias, chunk_size, activation, residual,
                              ln_eps, firsts).contiguous()


@memory_forward_op.register_fake
def _(x, weights, ln_weight, ln_bias, chunk_size, activation, residual, ln_eps,
      first_weights):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _reference_vjp(fn, inputs, grads):
    """Gradients of the reference fn(*inputs) (a tensor or tuple) against grads for the tensor
    inputs (None inputs get None). torch.func.vjp, not torch.autograd: inside a custom op's
    implementation (and in compiled backward graphs) autograd recording is off, while
    torch.func carries its own autograd level."""
    tensors = [t for t in inputs if isinstance(t, Tensor)]

    def f(*ts):
        it = iter(ts)
        outs = fn(*[next(it) if isinstance(t, Tensor) else None for t in inputs])
        return outs if isinstance(outs, tuple) else (outs,)
    _, vjp = torch.func.vjp(f, *tensors)
    got = iter(vjp(tuple(grads)))
    return [next(got) if isinstance(t, Tensor) else None for t in inputs]


@torch.library.custom_op("titans_cuda::memory_forward_bwd", mutates_args=())
def memory_forward_bwd_op(grad_y: Tensor, x: Tensor, weights: List[Tensor],
                          ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                          chunk_size: Optional[int], activation: str, residual: bool,
                          ln_eps: float, first_weights: List[Tensor]
                          ) -> Tuple[Tensor, List[Tensor], Tensor, Tensor, List[Tensor]]:
    """(dx like x, dW per layer like weights, d ln_weight [H, D], d ln_bias [H, D], d
    first_weights per layer (empty without them)); the LN gradients are zeros without LN."""
    H, D = x.shape[2], x.shape[3]
    firsts = list(first_weights)
    if kernel_reason(x, weights) is None:
        chunk = _chunk_for(x.shape[1], chunk_size, weights)
        o = _launch("backward", x, weights, chunk, activation, residual, ln_weight,
                    ln_bias, ln_eps, grad_y=grad_y, first_weights=firsts or None)
        n_chunks, n_sub = o["n_chunks"], o["n_sub"]
        lead = weights[0].dim() - 2
        d_w = [_sum_tiles(o[f"u{i + 1}"], n_chunks, n_sub, lead).to(w.dtype)
               for i, w in enumerate(weights)]
        d_first = [_sum_tiles(o[f"u{i + 1}_first"], 1, n_sub, w0.dim() - 2).to(w0.dtype)
                   for i, w0 in enumerate(firsts)]
        d_gamma, d_beta = _ln_grads(o, ln_weight, ln_bias, H, D, x.device)
        return o["grad_x"], d_w, d_gamma, d_beta, d_first

    n = len(weights)

    def fn(x_, lnw_, lnb_, *ws):
        return _forward_reference(x_, ws[:n], lnw_, lnb_, chunk_size, activation, residual,
                                  ln_eps, ws[n:] or None)
    g = _reference_vjp(fn, [x, ln_weight, ln_bias, *weights, *firsts], [grad_y])
    d_gamma, d_beta = _ln_grads_or_zeros(g[1], g[2], H, D, x.device)
    d_all = [gw.contiguous() for gw in g[3:]]
    return g[0].contiguous(), d_all[:n], d_gamma, d_beta, d_all[n:]


@memory_forward_bwd_op.register_fake
def _(grad_y, x, weights, ln_weight, ln_bias, chunk_size, activation, residual, ln_eps,
      first_weights):
    H, D = x.shape[2], x.shape[3]
    gamma_dtype = torch.float32 if ln_weight is None else ln_weight.dtype
    beta_dtype = torch.float32 if ln_bias is None else ln_bias.dtype
    like = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa
                       for t in ts or []]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), like(weights),
            x.new_empty(H, D, dtype=gamma_dtype), x.new_empty(H, D, dtype=beta_dtype),
            like(first_weights))


def _fwd_setup(ctx, inputs, output):
    x, weights, ln_weight, ln_bias, chunk_size, activation, residual, ln_eps, \
        first_weights = inputs
    ctx.n_layers = len(weights)
    ctx.has_first = len(first_weights) > 0
    ctx.has_ln = ln_weight is not None
    ctx.has_bias = ln_bias is not None
    ctx.kw = dict(chunk_size=chunk_size, activation=activation, residual=residual,
                  ln_eps=ln_eps)
    ctx.save_for_backward(x, *weights, *first_weights,
                          *(t for t in (ln_weight, ln_bias) if t is not None))


def _fwd_backward(ctx, grad_y):
    x, *rest = ctx.saved_tensors
    n = ctx.n_layers
    weights = rest[:n]
    firsts = list(rest[n:2 * n]) if ctx.has_first else []
    extra = rest[2 * n if ctx.has_first else n:]
    ln_weight = extra[0] if ctx.has_ln else None
    ln_bias = extra[1 if ctx.has_ln else 0] if ctx.has_bias else None
    d_x, d_w, d_gamma, d_beta, d_first = memory_forward_bwd_op(
        grad_y, x, list(weights), ln_weight, ln_bias, first_weights=firsts, **ctx.kw)
    return (d_x, list(d_w), d_gamma if ctx.has_ln else None,
            d_beta if ctx.has_bias else None, None, None, None, None,
            list(d_first) if ctx.has_first else [])


memory_forward_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ------------------------------------------------------------------------------------------
# memory_grad
# ------------------------------------------------------------------------------------------

def _grad_reference(k, v, lr, weights, ln_weight, ln_bias, chunk_size, activation, residual,
                    ln_eps):
    return ref.memory_grad(k, v, lr, weights, chunk_size=chunk_size, activation=activation,
                           residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                           ln_eps=ln_eps)


@torch.library.custom_op("titans_cuda::memory_grad", mutates_args=())
def memory_grad_op(k: Tensor, v: Tensor, lr: Tensor, weights: List[Tensor],
                   ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], chunk_size: int,
                   activation: str, residual: bool, ln_eps: float) -> List[Tensor]:
    """U per layer [B, H, NC, d_in, d_out] (fp32; fp64 for fp64 inputs on the reference)."""
    if kernel_reason(k, weights) is None:
        o = _launch("grad", k, weights, chunk_size, activation, residual, ln_weight,
                    ln_bias, ln_eps, v=v, lr=lr)
        return [_sum_tiles(o[f"u{i + 1}"], o["n_chunks"], o["n_sub"], 3)
                for i in range(len(weights))]
    return [u.contiguous() for u in _grad_reference(k, v, lr, weights, ln_weight, ln_bias,
                                                    chunk_size, activation, residual, ln_eps)]


@memory_grad_op.register_fake
def _(k, v, lr, weights, ln_weight, ln_bias, chunk_size, activation, residual, ln_eps):
    B, T, H, _ = k.shape
    n_chunks = -(-T // chunk_size)
    dtype = ref.compute_dtype(k, v, *weights)
    return [k.new_empty(B, H, n_chunks, w.shape[-2], w.shape[-1], dtype=dtype) for w in weights]


@torch.library.custom_op("titans_cuda::memory_grad_bwd", mutates_args=())
def memory_grad_bwd_op(grad_u: List[Tensor], k: Tensor, v: Tensor, lr: Tensor,
                       weights: List[Tensor], ln_weight: Optional[Tensor],
                       ln_bias: Optional[Tensor], chunk_size: int, activation: str,
                       residual: bool, ln_eps: float
                       ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], Tensor, Tensor]:
    """Second-order terms (dk, dv, dlr, dW per layer, d ln_weight, d ln_bias): the kernel
    (memory_mlp_grad_bwd.cu) where memory_grad has one, else the reference's graph."""
    H, D = k.shape[2], k.shape[3]
    if kernel_reason(k, weights, second_order=True) is None:
        o = _launch("grad_backward", k, weights, chunk_size, activation, residual, ln_weight,
                    ln_bias, ln_eps, v=v, lr=lr, grad_u=grad_u)
        lead = weights[0].dim() - 2
        d_w = [_sum_tiles(o[f"u{i + 1}"], o["n_chunks"], o["n_sub"], lead).to(w.dtype)
               for i, w in enumerate(weights)]
        d_gamma, d_beta = _ln_grads(o, ln_weight, ln_bias, H, D, k.device)
        return (o["grad_x"], o["grad_v"].to(v.dtype), o["grad_lr"].to(lr.dtype), d_w, d_gamma,
                d_beta)

    def fn(k_, v_, lr_, lnw_, lnb_, *ws):
        return tuple(_grad_reference(k_, v_, lr_, ws, lnw_, lnb_, chunk_size, activation,
                                     residual, ln_eps))
    g = _reference_vjp(fn, [k, v, lr, ln_weight, ln_bias, *weights],
                       [gu.to(ref.compute_dtype(k, v, *weights)) for gu in grad_u])
    d_gamma, d_beta = _ln_grads_or_zeros(g[3], g[4], H, D, k.device)
    d_k, d_v, d_lr, *d_w = [t.contiguous() for t in g[:3] + g[5:]]
    return d_k, d_v, d_lr, d_w, d_gamma, d_beta


@memory_grad_bwd_op.register_fake
def _(grad_u, k, v, lr, weights, ln_weight, ln_bias, chunk_size, activation, residual, ln_eps):
    H, D = k.shape[2], k.shape[3]
    gamma_dtype = torch.float32 if ln_weight is None else ln_weight.dtype
    beta_dtype = torch.float32 if ln_bias is None else ln_bias.dtype
    return (torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(lr, memory_format=torch.contiguous_format),
            [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights],
            k.new_empty(H, D, dtype=gamma_dtype), k.new_empty(H, D, dtype=beta_dtype))


def _grad_setup(ctx, inputs, output):
    k, v, lr, weights, ln_weight, ln_bias, chunk_size, activation, residual, ln_eps = inputs
    ctx.n_layers = len(weights)
    ctx.has_ln = ln_weight is not None
    ctx.has_bias = ln_bias is not None
    ctx.kw = dict(chunk_size=chunk_size, activation=activation, residual=residual,
                  ln_eps=ln_eps)
    ctx.save_for_backward(k, v, lr, *weights,
                          *(t for t in (ln_weight, ln_bias) if t is not None))


def _grad_backward(ctx, grad_u):
    k, v, lr, *rest = ctx.saved_tensors
    weights = rest[:ctx.n_layers]
    extra = rest[ctx.n_layers:]
    ln_weight = extra[0] if ctx.has_ln else None
    ln_bias = extra[1 if ctx.has_ln else 0] if ctx.has_bias else None
    grad_u = [g if g is not None else torch.zeros(
        k.shape[0], k.shape[2], -(-k.shape[1] // ctx.kw["chunk_size"]), *w.shape[-2:],
        dtype=ref.compute_dtype(k, v, *weights), device=k.device)
        for g, w in zip(grad_u, weights)]
    d_k, d_v, d_lr, d_w, d_gamma, d_beta = memory_grad_bwd_op(
        grad_u, k, v, lr, list(weights), ln_weight, ln_bias, **ctx.kw)
    return (d_k, d_v, d_lr, list(d_w), d_gamma if ctx.has_ln else None,
            d_beta if ctx.has_bias else None, None, None, None, None)


memory_grad_op.register_autograd(_grad_backward, setup_context=_grad_setup)
