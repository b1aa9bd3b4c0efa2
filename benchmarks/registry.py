"""Named benchmark shapes (issue 2 / KERNEL_NOTES): the default is the Titans layer size that the
project's goals are stated at."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    T: int
    H: int
    D: int
    hidden: int
    chunk: int
    dtype: str = "bfloat16"

    def with_T(self, T: int, B: int = None) -> "Shape":
        return replace(self, name=f"B{B or self.B}xT{T}", T=T, B=B or self.B)


SHAPES = {
    "default": Shape("default", B=2, T=8192, H=16, D=64, hidden=256, chunk=64),
    "long": Shape("long", B=1, T=32768, H=16, D=64, hidden=256, chunk=64),
    "short": Shape("short", B=8, T=2048, H=16, D=64, hidden=256, chunk=64),
    "cpu": Shape("cpu", B=1, T=256, H=2, D=16, hidden=64, chunk=16, dtype="float32"),
}

SWEEP_T = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
