"""Analytic FLOP counts (multiply-add = 2 FLOPs), per the cost model of KERNEL_NOTES, for a
depth-2 memory D -> Dh -> D. Executed-FLOP rates in the tables divide these by measured time."""
from __future__ import annotations


def memory_forward(D: int, Dh: int) -> int:
    """y = M_W(x) per token and head: two matmuls (LN, activation, residual are O(D + Dh))."""
    return 2 * D * Dh * 2


def memory_grad(D: int, Dh: int) -> int:
    """U per token and head: forward (4 D Dh), error back through W2 (2 D Dh), the two
    weight-gradient outer products (4 D Dh)."""
    return 10 * D * Dh


def memory_scan(D: int, Dh: int, C: int) -> float:
    """Per token and head: 4 FLOPs per weight element per chunk, spread over C tokens."""
    return 4 * (2 * D * Dh) / C


def neural_memory_forward(D: int, Dh: int, C: int) -> int:
    """The fused chunked memory per token and head (KERNEL_NOTES): key pass 4 D Dh, errors
    2 D Dh, weight update 4 D Dh, momentum update 4 D Dh, query pass through W and S 8 D Dh,
    causal intra-chunk terms 4 C (D + Dh)."""
    return 22 * D * Dh + 4 * C * (D + Dh)


def parallel_neural_memory_forward(D: int, Dh: int, C: int) -> float:
    """memory_grad + memory_scan + memory_forward per token and head."""
    return memory_grad(D, Dh) + memory_scan(D, Dh, C) + memory_forward(D, Dh)


def sdpa_causal_forward(T: int, D: int) -> float:
    """Causal attention per token and head, averaged over the sequence: 2 matmuls over ~T/2 keys."""
    return 2 * 2 * D * T / 2
