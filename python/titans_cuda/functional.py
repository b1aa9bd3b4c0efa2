"""The public functions of SPEC §5: validation, backend choice, then kernels or reference."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks as chk
from ._backend import use_kernels
from .ops.memory_mlp import ops as mlp_ops
from .ops.memory_mlp import reference as mlp_ref
from .ops.memory_scan import reference as scan_ref
from .ops.memory_scan.ops import memory_scan_op
from .ops.neural_memory import ops as nm_ops
from .ops.neural_memory import reference as nm_ref
from .state import MemoryState


# neural_memory's kernels: the streaming-decode kernel for dense calls of at most
# nm_ops.DECODE_MAX_T tokens, the chunked kernel for every other supported call.
def neural_memory(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, forget: Tensor,
                  momentum: Tensor, weights: Sequence[Tensor], *, chunk_size: int = 64,
                  activation: str = "silu", residual: bool = False,
                  ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                  ln_eps: float = 1e-6, read: str = "token",
                  initial_state: Optional[MemoryState] = None,
                  output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                  backend: str = "auto") -> Tuple[Tensor, Optional[MemoryState]]:
    """Titans neural long-term memory: write every token into a memory MLP by chunked gradient
    descent with momentum and forgetting, and read it with the queries (SPEC §2-4).

    Args:
        q, k, v: [B, T, H, D] queries, keys, values; float32, bfloat16 or float16 (float64 on
            the reference). With ``cu_seqlens``: [1, total, H, D], sequences packed.
        lr, forget, momentum: [B, T, H] per-token gates theta (>= 0), alpha and eta (in
            [0, 1]); any float dtype, used in fp32.
        weights: tuple of L >= 1 learned initial weights [H, d_in, d_out], D -> Dh -> ... -> D
            (for L = 1, [H, D, D]); broadcast over the batch.
        chunk_size: C >= 1; all tokens of a chunk take their gradient at the chunk-start weights.
        activation: "silu" or "gelu" (exact erf form), between layers.
        residual: add the input: M(x) = x + LN(f_W(x)).
        ln_weight, ln_bias: [H, D] LayerNorm on the memory output (eps ``ln_eps``); LayerNorm is
            applied when ln_weight is given.
        read: "token" reads o_t = M_{W_t}(q_t) after token t's own write; "chunk" reads with the
            weights at the start of t's chunk (Memory-as-Context).
        initial_state: a MemoryState to continue from (one per sequence); None starts from
            ``weights`` with zero momentum.
        output_final_state: also return the MemoryState after the last token.
        cu_seqlens: int32/int64 [N+1] sequence boundaries of a packed batch (B must be 1).
        backend: "auto" | "cuda" | "torch".

    Returns:
        (o, state): o [B, T, H, D] with q's dtype; state a MemoryState or None.

    Example::

        >>> B, T, H, D = 2, 256, 4, 64
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        >>> k = k / k.norm(dim=-1, keepdim=True)  # unit keys keep the inner loop stable
        >>> lr = torch.full((B, T, H), 0.01); forget = torch.full((B, T, H), 0.01)
        >>> momentum = torch.full((B, T, H), 0.9)
        >>> weights = (torch.randn(H, D, 4 * D) / D**0.5, torch.randn(H, 4 * D, D) / (4 * D)**0.5)
        >>> o, state = neural_memory(q, k, v, lr, forget, momentum, weights,
        ...                          output_final_state=True)
        >>> o.shape, state.offset
        (torch.Size([2, 256, 4, 64]), tensor([0, 0]))
    """
    B, T, H, D = chk.check_qkv(q, k, v)
    for name, g in (("lr", lr), ("forget", forget), ("momentum", momentum)):
        chk.check_gate(g, name, B, T, H)
    weights = chk.check_weights(weights, "weights", H, D, lead=(H,))
    chk.check_chunk_size(chunk_size)
    chk.check_memory_keywords(activation, residual, ln_weight, ln_bias, ln_eps, H, D)
    chk.check_choice(read, "read", chk.READS)
    cu_seqlens = chk.check_cu_seqlens(cu_seqlens, B, T)
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    chk.check_state(initial_state, n_seq, H, weights, chunk_size)
    named = dict(q=q, k=k, v=v, lr=lr, forget=forget, momentum=momentum, ln_weight=ln_weight,
                 ln_bias=ln_bias, cu_seqlens=cu_seqlens)
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    if initial_state is not None:
        named.update({f"initial_state.weights[{i}]": w
                      for i, w in enumerate(initial_state.weights)})
        named["initial_state.offset"] = initial_state.offset
    device = chk.check_same_device(named)
    kernel = "decode"
    reason = nm_ops.decode_reason(q, weights, cu_seqlens, initial_state)
    if reason is not None:
        kernel = "chunked"
        reason = nm_ops.chunked_reason(q, weights, chunk_size, cu_seqlens, initial_state)
    if use_kernels(backend, "neural_memory", device, reason):
        o, state = nm_ops.fused(q, k, v, lr, forget, momentum, weights, chunk_size=chunk_size,
                                activation=activation, residual=residual, ln_weight=ln_weight,
                                ln_bias=ln_bias, ln_eps=ln_eps, read=read,
                                initial_state=initial_state, cu_seqlens=cu_seqlens,
                                kernel=kernel, reason=reason)
        return o, state if output_final_state else None
    return nm_ref.neural_memory(
        q, k, v, lr, forget, momentum, weights, chunk_size=chunk_size, activation=activation,
        residual=residual, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, read=read,
        initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens)


def _check_block_weights(weights, name, B, T, H, D, chunk_size):
    if chunk_size is None and isinstance(weights, (tuple, list)) and any(
            isinstance(w, Tensor) and w.dim() == 5 for w in weights):
        raise ValueError(f"{name} are per chunk ([B, H, n_chunks, d_in, d_out]) so chunk_size "
                         f"must be given")
    n_chunks = None if chunk_size is None else -(-T // chunk_size)
    leads = [(H,), (B, H)] + ([] if n_chunks is None else [(B, H, n_chunks)])
    return chk.check_weights(weights, name, H, D, allow_lead=leads)


def memory_forward(x: Tensor, weights: Sequence[Tensor], *, chunk_size: Optional[int] = None,
                   activation: str = "silu", residual: bool = False,
                   ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                   ln_eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """y = M_W(x), the memory MLP read with given weights (SPEC §1).

    Args:
        x: [B, T, H, D].
        weights: tuple of L tensors, each [H, d_in, d_out] (shared), [B, H, d_in, d_out] (per
            row) or [B, H, n_chunks, d_in, d_out] with ``chunk_size`` (token t uses chunk
            t // chunk_size; n_chunks = ceil(T / chunk_size)).
    Returns:
        y [B, T, H, D] with x's dtype.
    """
    if chunk_size is not None:
        chk.check_chunk_size(chunk_size)
    B, T, H, D = chk.check_qkv(x, None, None, names=("x", "", ""))
    weights = _check_block_weights(weights, "weights", B, T, H, D, chunk_size)
    chk.check_memory_keywords(activation, residual, ln_weight, ln_bias, ln_eps, H, D)
    named = {"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias}
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    device = chk.check_same_device(named)
    if use_kernels(backend, "memory_forward", device, mlp_ops.kernel_reason(x, weights)):
        return mlp_ops.memory_forward_op(x, list(weights), ln_weight, ln_bias, chunk_size,
                                         activation, residual, ln_eps, [])
    return mlp_ref.memory_forward(x, weights, chunk_size=chunk_size, activation=activation,
                                  residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                                  ln_eps=ln_eps)


def memory_grad(k: Tensor, v: Tensor, lr: Tensor, weights: Sequence[Tensor], *, chunk_size: int,
                activation: str = "silu", residual: bool = False,
                ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                ln_eps: float = 1e-6, backend: str = "auto") -> Tuple[Tensor, ...]:
    """Per-chunk summed inner gradients U_j = sum_{t in chunk j} lr_t grad_W ||M_W(k_t) - v_t||^2.

    Args:
        k, v: [B, T, H, D]; lr: [B, T, H].
        weights: as in memory_forward ([H, ...], [B, H, ...] or [B, H, n_chunks, ...]).
        chunk_size: C >= 1; the last chunk may be partial.
    Returns:
        tuple of L tensors [B, H, n_chunks, d_in, d_out], float32 (float64 for float64 inputs).
    """
    chk.check_chunk_size(chunk_size)
    B, T, H, D = chk.check_qkv(k, v, None, names=("k", "v", ""))
    chk.check_gate(lr, "lr", B, T, H)
    weights = _check_block_weights(weights, "weights", B, T, H, D, chunk_size)
    chk.check_memory_keywords(activation, residual, ln_weight, ln_bias, ln_eps, H, D)
    named = {"k": k, "v": v, "lr": lr, "ln_weight": ln_weight, "ln_bias": ln_bias}
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    device = chk.check_same_device(named)
    reason = mlp_ops.kernel_reason(k, weights, second_order=True)
    if use_kernels(backend, "memory_grad", device, reason):
        return tuple(mlp_ops.memory_grad_op(k, v, lr, list(weights), ln_weight, ln_bias,
                                            chunk_size, activation, residual, ln_eps))
    return mlp_ref.memory_grad(k, v, lr, weights, chunk_size=chunk_size, activation=activation,
                               residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
                               ln_eps=ln_eps)


def memory_scan(updates: Sequence[Tensor], forget: Tensor, momentum: Tensor, *,
                initial_weights: Sequence[Tensor],
                initial_momentum: Optional[Sequence[Tensor]] = None,
                backend: str = "auto") -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
    """The chunk-level memory recurrence, for every layer:

        S_j = eta_j S_{j-1} - U_j,    W_j = (1 - alpha_j) W_{j-1} + S_j,    j = 1..NC

    Args:
        updates: tuple of L tensors U [B, H, NC, d_in, d_out] (e.g. from memory_grad).
        forget, momentum: [B, NC, H] per-chunk alpha and eta.
        initial_weights: tuple of L tensors W_0, [H, d_in, d_out] or [B, H, d_in, d_out].
        initial_momentum: None (S_0 = 0) or a tuple like initial_weights.
    Returns:
        (W_all, S_last): W_all a tuple of [B, H, NC, d_in, d_out] holding W_1..W_NC; S_last a
        tuple of [B, H, d_in, d_out]. float32 (float64 for float64 updates).

    Example::

        >>> U = (torch.randn(2, 4, 8, 16, 64), torch.randn(2, 4, 8, 64, 16))
        >>> alpha, eta = torch.rand(2, 8, 4), torch.rand(2, 8, 4)
        >>> W0 = (torch.randn(4, 16, 64), torch.randn(4, 64, 16))
        >>> W_all, S_last = memory_scan(U, alpha, eta, initial_weights=W0)
        >>> W_all[0].shape, S_last[1].shape
        (torch.Size([2, 4, 8, 16, 64]), torch.Size([2, 4, 64, 16]))
    """
    if isinstance(updates, Tensor) or not isinstance(updates, (tuple, list)) or not updates:
        raise TypeError("updates must be a non-empty tuple of tensors [B, H, NC, d_in, d_out], "
                        f"one per layer, got {type(updates).__name__}")
    for i, u in enumerate(updates):
        chk.check_float(u, f"updates[{i}]", 5)
    B, H, n_chunks = updates[0].shape[:3]
    for i, u in enumerate(updates):
        if tuple(u.shape[:3]) != (B, H, n_chunks):
            raise ValueError(f"updates[{i}] must have leading dims (B, H, NC) = "
                             f"{(B, H, n_chunks)} like updates[0], got {tuple(u.shape)}")
    for name, g in (("forget", forget), ("momentum", momentum)):
        chk.check_float(g, name, 3)
        chk.check_shape(g, name, (B, n_chunks, H), "[B, NC, H], NC = updates' chunk dim")
    init_w = _check_scan_state(initial_weights, "initial_weights", updates, B, H)
    init_s = None if initial_momentum is None else \
        _check_scan_state(initial_momentum, "initial_momentum", updates, B, H)
    named = {"forget": forget, "momentum": momentum}
    for group, tensors in (("updates", updates), ("initial_weights", init_w),
                           ("initial_momentum", init_s or ())):
        named.update({f"{group}[{i}]": t for i, t in enumerate(tensors)})
    device = chk.check_same_device(named)
    float64 = any(u.dtype == torch.float64 for u in updates)
    kernels = use_kernels(backend, "memory_scan", device,
                          "float64 updates run on the reference only" if float64 else None)
    w_all, s_last = [], []
    for layer, u in enumerate(updates):
        d_in, d_out = u.shape[-2:]
        E = d_in * d_out
        dtype = torch.float64 if float64 else torch.float32
        u_flat = u.to(dtype).reshape(B, H, n_chunks, E)
        w0 = init_w[layer].to(dtype).reshape(-1, H, E).expand(B, H, E)
        s0 = None if init_s is None else init_s[layer].to(dtype).reshape(-1, H, E).expand(B, H, E)
        if kernels:
            w, s = memory_scan_op(u_flat, forget.float(), momentum.float(), w0, s0)
        else:
            w, s = scan_ref.scan_forward(u_flat, forget, momentum, w0, s0)
        w_all.append(w.reshape(B, H, n_chunks, d_in, d_out))
        s_last.append(s.reshape(B, H, d_in, d_out))
    return tuple(w_all), tuple(s_last)


def _check_scan_state(tensors, name, updates, B, H):
    if isinstance(tensors, Tensor) or not isinstance(tensors, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of tensors (one per layer), got "
                        f"{type(tensors).__name__}")
    if len(tensors) != len(updates):
        raise ValueError(f"{name} must hold {len(updates)} layers like updates, got "
                         f"{len(tensors)}")
    for i, (t, u) in enumerate(zip(tensors, updates)):
        chk.check_float(t, f"{name}[{i}]")
        d = tuple(u.shape[-2:])
        if tuple(t.shape) not in ((H,) + d, (B, H) + d):
            raise ValueError(f"{name}[{i}] must have shape {(H,) + d} or {(B, H) + d} "
                             f"([H | B, H, d_in, d_out] like updates[{i}]), got {tuple(t.shape)}")
    return tuple(tensors)


def parallel_neural_memory(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, forget: Tensor,
                           momentum: Tensor, weights: Sequence[Tensor], *, chunk_size: int = 64,
                           activation: str = "silu", residual: bool = False,
                           ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                           ln_eps: float = 1e-6, output_final_state: bool = False,
                           backend: str = "auto"):
    """The fully parallel Titans variant (titans-pytorch's default), composed from the blocks:
    every chunk takes its gradient at the call's initial weights, the memory evolves over chunks
    with per-chunk gates, and chunk j is read with the weights after chunk j-1:

        U_j = sum_{t in chunk j} lr_t grad_W ||M_{W_0}(k_t) - v_t||^2       (memory_grad)
        S_j = eta_j S_{j-1} - U_j,  W_j = (1 - alpha_j) W_{j-1} + S_j,  S_0 = 0  (memory_scan)
        o_t = M_{W_{j-1}}(q_t) for t in chunk j                           (memory_forward)

    Unlike neural_memory, no token's gradient sees a write of the same call, so all chunks run in
    parallel; it is not the paper's chunked recurrence.

    Args:
        q, k, v: [B, T, H, D]; lr: [B, T, H] per-token theta.
        forget, momentum: [B, NC, H] per-chunk alpha and eta, NC = ceil(T / chunk_size).
        weights: tuple of L initial weights [H, d_in, d_out] (or [B, H, d_in, d_out]).
        other keywords: as in neural_memory.
    Returns:
        o [B, T, H, D] with q's dtype; with output_final_state=True, (o, (W_NC, S_NC)) where each
        is a tuple of L float32 tensors [B, H, d_in, d_out].
    """
    B, T, H, D = chk.check_qkv(q, k, v)
    chk.check_chunk_size(chunk_size)
    n_chunks = -(-T // chunk_size)
    for name, g in (("forget", forget), ("momentum", momentum)):
        chk.check_float(g, name, 3)
        chk.check_shape(g, name, (B, n_chunks, H), f"[B, NC, H] per-chunk gates, NC = "
                        f"ceil(T / chunk_size) = {n_chunks}")
    weights = chk.check_weights(weights, "weights", H, D, allow_lead=[(H,), (B, H)])
    mem = dict(activation=activation, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias,
               ln_eps=ln_eps, backend=backend)
    updates = memory_grad(k, v, lr, weights, chunk_size=chunk_size, **mem)
    w_all, s_last = memory_scan(updates, forget, momentum, initial_weights=weights,
                                backend=backend)
    w_first = [w0.to(w.dtype).expand(B, H, *w0.shape[-2:]) for w0, w in zip(weights, w_all)]
    if backend != "torch" and mlp_ops.kernel_reason(q, w_all) is None:
        # the kernel reads chunk j with W_{j-1} in place (no concatenated copy of W_all)
        o = mlp_ops.memory_forward_op(q, list(w_all), ln_weight, ln_bias, chunk_size,
                                      activation, residual, ln_eps,
                                      first_weights=[w.to(torch.float32) for w in weights])
    else:
        read_weights = tuple(torch.cat([w0.unsqueeze(2), w[:, :, :-1]], dim=2)  # W_{j-1}
                             for w0, w in zip(w_first, w_all))
        o = memory_forward(q, read_weights, chunk_size=chunk_size, **mem)
    if not output_final_state:
        return o
    w_last = tuple(w[:, :, -1] if n_chunks else w0.contiguous() for w0, w in zip(w_first, w_all))
    return o, (w_last, s_last)
