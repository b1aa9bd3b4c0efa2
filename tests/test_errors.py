"""SPEC §6: every bad input raises an exception that names the argument and what was expected."""
from __future__ import annotations

import pytest
import torch

from titans_cuda import MemoryState, memory_forward, memory_grad, memory_scan, neural_memory

B, T, H, D = 2, 8, 2, 4


def _good(dtype=torch.float32):
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))
    lr, forget, momentum = (torch.rand(B, T, H) for _ in range(3))
    weights = (torch.randn(H, D, 8), torch.randn(H, 8, D))
    return dict(q=q, k=k, v=v, lr=lr, forget=forget, momentum=momentum, weights=weights)


def _call(**over):
    a = _good()
    kw = {n: over.pop(n) for n in list(over) if n not in a}
    a.update(over)
    return neural_memory(a["q"], a["k"], a["v"], a["lr"], a["forget"], a["momentum"],
                         a["weights"], **kw)


def _state(n=B, offset=None, layers=2, dtype=torch.float32):
    w = (torch.randn(n, H, D, 8, dtype=dtype), torch.randn(n, H, 8, D, dtype=dtype))[:layers]
    return MemoryState(w, w, w, torch.zeros(n, dtype=torch.int64) if offset is None else offset)


CASES = [
    # (overrides, exception, words the message must contain)
    (dict(q=torch.randn(B, T, H)), ValueError, ["q", "4 dimensions"]),
    (dict(k=torch.randn(B, T + 1, H, D)), ValueError, ["k", "shape"]),
    (dict(v=torch.randn(B, T, H, D + 1)), ValueError, ["v", "shape"]),
    (dict(q=torch.randn(B, T, H, D).int()), TypeError, ["q", "dtype"]),
    (dict(k=torch.randn(B, T, H, D, dtype=torch.float16)), TypeError, ["k", "dtype"]),
    (dict(lr=torch.rand(B, T)), ValueError, ["lr", "3 dimensions"]),
    (dict(forget=torch.rand(B, T, H + 1)), ValueError, ["forget", "[B, T, H]"]),
    (dict(momentum=torch.ones(B, T, H, dtype=torch.int32)), TypeError, ["momentum",
                                                                        "floating"]),
    (dict(weights=torch.randn(H, D, D)), TypeError, ["weights", "tuple"]),
    (dict(weights=()), ValueError, ["weights", "at least one"]),
    (dict(weights=(torch.randn(H, D + 1, 8), torch.randn(H, 8, D))), ValueError,
     ["weights[0]", "d_in"]),
    (dict(weights=(torch.randn(H, D, 8), torch.randn(H, 7, D))), ValueError,
     ["weights[1]", "d_in"]),
    (dict(weights=(torch.randn(H, D, 8), torch.randn(H, 8, D + 2))), ValueError,
     ["weights[1]", "d_out"]),
    (dict(weights=(torch.randn(H + 1, D, 8), torch.randn(H + 1, 8, D))), ValueError,
     ["weights[0]", "leading dims"]),
    (dict(weights=(torch.randn(H, D, D).int(),)), TypeError, ["weights[0]", "floating"]),
    (dict(chunk_size=0), ValueError, ["chunk_size", ">= 1"]),
    (dict(chunk_size=2.5), TypeError, ["chunk_size", "int"]),
    (dict(activation="relu"), ValueError, ["activation", "silu"]),
    (dict(read="all"), ValueError, ["read", "token"]),
    (dict(backend="triton"), ValueError, ["backend", "auto"]),
    (dict(residual="yes"), TypeError, ["residual", "bool"]),
    (dict(ln_weight=torch.randn(H, D + 1)), ValueError, ["ln_weight", "[H, D]"]),
    (dict(ln_bias=torch.randn(H, D)), ValueError, ["ln_bias", "ln_weight"]),
    (dict(ln_weight=torch.ones(H, D), ln_eps=0.0), ValueError, ["ln_eps", "positive"]),
    (dict(cu_seqlens=torch.tensor([0, 3, T], dtype=torch.int32)), ValueError,
     ["cu_seqlens", "[1, total, H, D]"]),
    (dict(initial_state="state"), TypeError, ["initial_state", "MemoryState"]),
    (dict(initial_state=_state(n=B + 1)), ValueError, ["initial_state.weights[0]", "shape"]),
    (dict(initial_state=_state(layers=1)), ValueError, ["initial_state.weights", "2 layers"]),
    (dict(initial_state=_state(offset=torch.tensor([0, 64]))), ValueError,
     ["initial_state.offset", "[0, chunk_size=64)"]),
    (dict(initial_state=_state(offset=torch.tensor([0.0, 1.0]))), TypeError,
     ["initial_state.offset", "int"]),
    (dict(initial_state=_state(offset=torch.tensor([0, 1, 2]))), ValueError,
     ["initial_state.offset", "one per sequence"]),
]


@pytest.mark.parametrize("over,exc,words", CASES,
                         ids=[f"{i}-{'-'.join(c[2][:1])}" for i, c in enumerate(CASES)])
def test_neural_memory_bad_input(over, exc, words):
    with pytest.raises(exc) as info:
        _call(**over)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def _packed(lens):
    total = sum(lens)
    q, k, v = (torch.randn(1, total, H, D) for _ in range(3))
    gates = [torch.rand(1, total, H) for _ in range(3)]
    return q, k, v, *gates, (torch.randn(H, D, D),)


@pytest.mark.parametrize("cu,words", [
    (torch.tensor([0, 5, 3, 9], dtype=torch.int32), ["cu_seqlens", "non-decreasing"]),
    (torch.tensor([1, 5, 9], dtype=torch.int32), ["cu_seqlens", "start at 0"]),
    (torch.tensor([0, 5, 8], dtype=torch.int32), ["cu_seqlens", "end at the total length 9"]),
    (torch.tensor([0, 5, 9.0]), ["cu_seqlens", "dtype"]),
    (torch.tensor([[0, 9]], dtype=torch.int32), ["cu_seqlens", "1 dimensions"]),
    (torch.tensor([0], dtype=torch.int32), ["cu_seqlens", "N+1 >= 2"]),
])
def test_bad_cu_seqlens(cu, words):
    with pytest.raises((ValueError, TypeError)) as info:
        neural_memory(*_packed([5, 4]), cu_seqlens=cu)
    for w in words:
        assert w in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices to mismatch")
def test_mixed_devices():
    a = _good()
    with pytest.raises(RuntimeError, match="one device"):
        neural_memory(a["q"].cuda(), a["k"], a["v"], a["lr"], a["forget"], a["momentum"],
                      a["weights"])


def test_mixed_devices_meta():
    a = _good()
    with pytest.raises(RuntimeError, match=r"q is on cpu but k is on meta"):
        neural_memory(a["q"], a["k"].to("meta"), a["v"], a["lr"], a["forget"], a["momentum"],
                      a["weights"])


def test_backend_cuda_without_gpu_or_kernel():
    a = _good()
    with pytest.raises(RuntimeError, match=r"backend='cuda'"):
        neural_memory(*a.values(), backend="cuda")
    with pytest.raises(RuntimeError, match=r"memory_scan\(backend='cuda'\) cannot run"):
        memory_scan((torch.randn(B, H, 3, D, D),), torch.rand(B, 3, H), torch.rand(B, 3, H),
                    initial_weights=(torch.randn(H, D, D),), backend="cuda")
    with pytest.raises(RuntimeError, match=r"memory_forward\(backend='cuda'\)"):
        memory_forward(a["q"], a["weights"], backend="cuda")


def test_block_errors():
    x = torch.randn(B, T, H, D)
    w = (torch.randn(B, H, 4, D, D),)
    with pytest.raises(ValueError, match="chunk_size must be given"):
        memory_forward(x, w)
    with pytest.raises(ValueError, match=r"weights\[0\] must have leading dims"):
        memory_forward(x, (torch.randn(B, H, 3, D, D),), chunk_size=2)  # 4 chunks, not 3
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        memory_grad(x, x, torch.rand(B, T, H), (torch.randn(H, D, D),), chunk_size=None)
    with pytest.raises(ValueError, match="lr must have shape"):
        memory_grad(x, x, torch.rand(B, T, H + 1), (torch.randn(H, D, D),), chunk_size=2)
    U = (torch.randn(B, H, 3, D, D),)
    with pytest.raises(ValueError, match=r"forget must have shape \(2, 3, 2\)"):
        memory_scan(U, torch.rand(B, H, 3), torch.rand(B, 3, H),
                    initial_weights=(torch.randn(H, D, D),))
    with pytest.raises(ValueError, match=r"initial_weights\[0\] must have shape"):
        memory_scan(U, torch.rand(B, 3, H), torch.rand(B, 3, H),
                    initial_weights=(torch.randn(H, D, D + 1),))
    with pytest.raises(ValueError, match=r"initial_momentum must hold 1 layers"):
        memory_scan(U, torch.rand(B, 3, H), torch.rand(B, 3, H),
                    initial_weights=(torch.randn(H, D, D),), initial_momentum=())
    with pytest.raises(TypeError, match="updates must be a non-empty tuple"):
        memory_scan(U[0], torch.rand(B, 3, H), torch.rand(B, 3, H),
                    initial_weights=(torch.randn(H, D, D),))
    with pytest.raises(ValueError, match=r"updates\[1\] must have leading dims"):
        memory_scan(U + (torch.randn(B, H, 4, D, D),), torch.rand(B, 3, H), torch.rand(B, 3, H),
                    initial_weights=(torch.randn(H, D, D),) * 2)


@pytest.mark.parametrize("read", ["token", "chunk"])
def test_nan_propagates_only_where_it_should(read):
    """A NaN key at token 5 (chunk 1 of size 4) of row 0, head 1. Token reads: the chunked dual
    form multiplies masked-out entries by zero, so the whole chunk 1 and everything after turn
    NaN (documented in the README); chunk reads: chunk 1 reads W before the chunk, so only
    chunks 2+ turn NaN. Chunk 0, head 0 and row 1 never see it."""
    a = _good()
    a["k"] = a["k"] / a["k"].norm(dim=-1, keepdim=True)
    a["lr"] = a["lr"] * 0.1
    a["k"][0, 5, 1, 0] = float("nan")
    o, _ = neural_memory(*a.values(), chunk_size=4, read=read)
    first_nan = 4 if read == "token" else 8
    assert torch.isnan(o[0, first_nan:, 1]).all()
    assert torch.isfinite(o[0, :first_nan, 1]).all()
    assert torch.isfinite(o[0, :, 0]).all() and torch.isfinite(o[1]).all()


def test_a_returned_offset_is_trusted_until_modified(monkeypatch):
    """check_state reads an offset back to the host (a GPU synchronisation) unless this library
    computed it for the same chunk size and it was not modified in place since; a modified or
    foreign offset is checked, and a bad one still raises."""
    import titans_cuda._checks as chk
    from titans_cuda import state as state_mod
    _, st = _call(output_final_state=True, chunk_size=4)
    assert state_mod.is_own_offset(st.offset, 4) and not state_mod.is_own_offset(st.offset, 8)
    reads = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        if a and a[0] == "cpu":
            reads.append(self)
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    chk.check_state(st, B, H, _good()["weights"], 4)
    assert reads == []  # trusted: no read-back
    chk.check_state(st, B, H, _good()["weights"], 8)  # another chunk size: checked
    assert len(reads) == 1
    st.offset.fill_(7)  # modified in place: checked again, and now out of range
    assert not state_mod.is_own_offset(st.offset, 4)
    with pytest.raises(ValueError, match="initial_state.offset"):
        _call(initial_state=st, chunk_size=4)
    foreign = MemoryState(st.weights, st.momentum, st.chunk_weights, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="initial_state.offset"):
        _call(initial_state=foreign, chunk_size=4)
    with torch.inference_mode():  # no version counter: never trusted
        _, st_inf = _call(output_final_state=True, chunk_size=4)
    assert not state_mod.is_own_offset(st_inf.offset, 4)
