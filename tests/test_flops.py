"""The benchmark's analytic FLOP counts against the cost model quoted in KERNEL_NOTES."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import flops  # noqa: E402


def test_neural_memory_cost_model_matches_kernel_notes():
    # "D=64, Dh=256, C=64: ~0.44 MFLOP; D=128, Dh=512: ~1.6 MFLOP" per token per head
    assert abs(flops.neural_memory_forward(64, 256, 64) / 1e6 - 0.44) < 0.01
    assert abs(flops.neural_memory_forward(128, 512, 64) / 1e6 - 1.6) < 0.05


def test_block_counts():
    assert flops.memory_forward(64, 256) == 4 * 64 * 256
    assert flops.memory_grad(64, 256) == 10 * 64 * 256
    assert flops.memory_scan(64, 256, 64) == 4 * 2 * 64 * 256 / 64
    assert flops.sdpa_causal_forward(8192, 64) == 2 * 64 * 8192
