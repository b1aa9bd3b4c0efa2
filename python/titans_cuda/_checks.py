"""Argument validation shared by every public function (SPEC §6).

Every message names the argument and says what was expected. Shape and rank problems raise
ValueError, dtype and type problems TypeError, device and backend problems RuntimeError.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .ops.activations import ACTIVATIONS

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
READS = ("token", "chunk")
BACKENDS = ("auto", "cuda", "torch")


def check_tensor(x, name: str, ndim: Optional[int] = None, dtypes=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {x.dtype}")
    return x


def check_float(x, name: str, ndim: Optional[int] = None) -> torch.Tensor:
    check_tensor(x, name, ndim)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_shape(x: torch.Tensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got "
                         f"{tuple(x.shape)}")


def check_choice(value, name: str, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{name} must be >= 1, got {chunk_size}")
    return chunk_size


def check_same_device(named: dict) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise RuntimeError(f"all tensors must be on one device: {first_name} is on {first} "
                               f"but {name} is on {dev}")
    return first


def check_weights(weights, name: str, H: int, D: int, lead: Sequence[int] = (),
                  allow_lead: Sequence[Sequence[int]] = ()) -> tuple:
    """A tuple of L >= 1 float tensors [*lead, d_in, d_out], chaining D -> ... -> D, with H heads.
    ``allow_lead`` lists the admissible leading shapes (e.g. (H,), (B, H), (B, H, NC))."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of tensors (one per memory layer), got "
                        f"{type(weights).__name__}")
    if len(weights) < 1:
        raise ValueError(f"{name} must hold at least one layer, got an empty tuple")
    lead_ok = [tuple(s) for s in (allow_lead or [lead])]
    d_in = D
    first_lead = None
    for layer, w in enumerate(weights):
        lname = f"{name}[{layer}]"
        check_float(w, lname)
        if w.dtype not in INPUT_DTYPES:
            raise TypeError(f"{lname} must be float32 (or float64), got {w.dtype}")
        if w.dim() < 3:
            raise ValueError(f"{lname} must be [{', '.join(['...'] + ['d_in', 'd_out'])}] with "
                             f"leading dims one of {lead_ok}, got shape {tuple(w.shape)}")
        w_lead = tuple(w.shape[:-2])
        if w_lead not in lead_ok:
            raise ValueError(f"{lname} must have leading dims one of {lead_ok} (H={H} heads), "
                             f"got shape {tuple(w.shape)}")
        if first_lead is None:
            first_lead = w_lead
        elif w_lead != first_lead:
            raise ValueError(f"{lname} has leading dims {w_lead} but {name}[0] has {first_lead}; "
                             f"every layer must use the same layout")
        if w.shape[-2] != d_in:
            expect = f"the head dim D={D}" if layer == 0 else f"{name}[{layer - 1}]'s d_out"
            raise ValueError(f"{lname} must have d_in={d_in} ({expect}), got shape "
                             f"{tuple(w.shape)}")
        d_in = w.shape[-1]
    if d_in != D:
        raise ValueError(f"{name}[{len(weights) - 1}] must have d_out={D} (the head dim D), got "
                         f"shape {tuple(weights[-1].shape)}")
    return tuple(weights)


def check_ln(ln_weight, ln_bias, H: int, D: int) -> None:
    if ln_weight is None:
        if ln_bias is not None:
            raise ValueError("ln_bias was given without ln_weight; LayerNorm needs ln_weight "
                             "[H, D] (ln_bias is optional)")
        return
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is None:
            continue
        check_float(p, name, 2)
        check_shape(p, name, (H, D), "[H, D]")


def check_memory_keywords(activation, residual, ln_weight, ln_bias, ln_eps, H, D) -> None:
    check_choice(activation, "activation", ACTIVATIONS)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    check_ln(ln_weight, ln_bias, H, D)
    if isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not ln_eps > 0:
        raise ValueError(f"ln_eps must be a positive float, got {ln_eps!r}")


def check_qkv(q, k, v, names=("q", "k", "v")):
    tensors = [t for t in (q, k, v) if t is not None]
    tnames = [n for n, t in zip(names, (q, k, v)) if t is not None]
    for t, n in zip(tensors, tnames):
        check_tensor(t, n, 4, INPUT_DTYPES)
    ref, ref_name = tensors[0], tnames[0]
    for t, n in zip(tensors[1:], tnames[1:]):
        if t.shape != ref.shape:
            raise ValueError(f"{n} must have the shape of {ref_name} [B, T, H, D] = "
                             f"{tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{n} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    return tuple(ref.shape)


def check_gate(g, name: str, B: int, T: int, H: int) -> None:
    check_float(g, name, 3)
    check_shape(g, name, (B, T, H), "[B, T, H] like q's first three dims")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> Optional[torch.Tensor]:
    if cu_seqlens is None:
        return None
    check_tensor(cu_seqlens, "cu_seqlens", 1, (torch.int32, torch.int64))
    if B != 1:
        raise ValueError(f"with cu_seqlens, q/k/v must be packed as [1, total, H, D]; got B={B}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold N+1 >= 2 offsets, got {cu_seqlens.numel()}")
    cu = cu_seqlens.to("cpu")
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens must end at the total length {T} (q.shape[1]), got "
                         f"{int(cu[-1])}")
    return cu_seqlens


def check_state(state, n_seq: int, H: int, weights: tuple, chunk_size: int):
    from .state import MemoryState, is_own_offset
    if state is None:
        return None
    if not isinstance(state, MemoryState):
        raise TypeError(f"initial_state must be a titans_cuda.MemoryState, got "
                        f"{type(state).__name__}")
    for field in ("weights", "momentum", "chunk_weights"):
        tensors = getattr(state, field)
        if len(tensors) != len(weights):
            raise ValueError(f"initial_state.{field} must hold {len(weights)} layers (like "
                             f"weights), got {len(tensors)}")
        for layer, (t, w) in enumerate(zip(tensors, weights)):
            name = f"initial_state.{field}[{layer}]"
            check_float(t, name, 4)
            check_shape(t, name, (n_seq, H, w.shape[-2], w.shape[-1]),
                        "[N, H, d_in, d_out], N = number of sequences")
    off = state.offset
    check_tensor(off, "initial_state.offset", 1)
    if off.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"initial_state.offset must be an int32/int64 tensor, got {off.dtype}")
    if off.shape[0] != n_seq:
        raise ValueError(f"initial_state.offset must have shape ({n_seq},) (one per sequence), "
                         f"got {tuple(off.shape)}")
    if is_own_offset(off, chunk_size):  # a previous call's, unmodified: no read-back
        return state
    off_cpu = off.to("cpu")
    if n_seq and (bool((off_cpu < 0).any()) or bool((off_cpu >= chunk_size).any())):
        raise ValueError(f"initial_state.offset must lie in [0, chunk_size={chunk_size}), got "
                         f"{off_cpu.tolist()}")
    return state
