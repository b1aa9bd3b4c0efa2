"""MemoryState: what a neural memory carries from one call to the next (SPEC §4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch


@dataclass(frozen=True)
class MemoryState:
    """Per sequence n and head h, for each of the L layers of the memory MLP:

    - ``weights``: W after the last token, tuple of L tensors [N, H, d_in, d_out] (fp32)
    - ``momentum``: S (the surprise) after the last token, same shapes
    - ``chunk_weights``: the weights at the start of the chunk that is still open, at which
      its remaining tokens take their gradients, same shapes
    - ``offset``: integer tensor [N], tokens already in that open chunk (0 <= offset < C);
      0 means no chunk is open and the next token starts one at ``weights``.

    Build one yourself to start every sequence from its own weights, e.g.
    ``MemoryState.from_weights(params, batch=4)``. Immutable: calls return new states.
    """

    weights: Tuple[torch.Tensor, ...]
    momentum: Tuple[torch.Tensor, ...]
    chunk_weights: Tuple[torch.Tensor, ...]
    offset: torch.Tensor

    def __post_init__(self):
        for name in ("weights", "momentum", "chunk_weights"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
                raise TypeError(f"MemoryState.{name} must be a tuple of tensors, one per layer, "
                                f"got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.offset, torch.Tensor):
            raise TypeError(f"MemoryState.offset must be an integer tensor [N], got "
                            f"{type(self.offset).__name__}")

    @classmethod
    def from_weights(cls, weights: Sequence[torch.Tensor], batch: int) -> "MemoryState":
        """The state a call starts from without initial_state: W = weights ([H, d_in, d_out]
        each, broadcast over ``batch`` sequences), S = 0, chunk_weights = W, offset = 0."""
        w = tuple(t.detach().float().unsqueeze(0).expand(batch, *t.shape).contiguous()
                  for t in weights)
        return cls(w, tuple(torch.zeros_like(t) for t in w), w,
                   torch.zeros(batch, dtype=torch.int64, device=w[0].device))

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    def detach(self) -> "MemoryState":
        """The same state cut from the autograd graph (truncated back-propagation)."""
        return MemoryState(tuple(t.detach() for t in self.weights),
                           tuple(t.detach() for t in self.momentum),
                           tuple(t.detach() for t in self.chunk_weights), self.offset)
