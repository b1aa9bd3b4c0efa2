"""MemoryState: what a neural memory carries from one call to the next (SPEC §4)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

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


# The offsets this library computed (a call's final offset, valid for its chunk size by
# construction), by id: (weak reference, version counter then, chunk_size). check_state trusts
# such an offset without reading it back to the host, a synchronisation with the GPU per call
# that would keep a streaming loop's host from running ahead, unless it was modified in place
# since (its version counter moved). Inference tensors have no version counter: not trusted.
_OWN_OFFSETS: Dict[int, tuple] = {}


def own_offset(offset: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Records ``offset`` (computed by this library for ``chunk_size``) as valid; returns it."""
    if offset.is_inference():
        return offset
    key = id(offset)
    ref = weakref.ref(offset, lambda _, key=key: _OWN_OFFSETS.pop(key, None))
    _OWN_OFFSETS[key] = (ref, offset._version, int(chunk_size))
    return offset


def is_own_offset(offset: torch.Tensor, chunk_size: int) -> bool:
    """Whether ``offset`` is one own_offset recorded for ``chunk_size``, unmodified since."""
    entry = _OWN_OFFSETS.get(id(offset))
    return (entry is not None and entry[0]() is offset and not offset.is_inference() and
            entry[1] == offset._version and entry[2] == int(chunk_size))
