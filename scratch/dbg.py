import sys, torch
sys.path.insert(0, "tests")
import test_gpu_chunked as t
from conftest import rel_err
from titans_cuda import neural_memory
import zlib
ids = sys.argv[1:]
for case in t.GRID:
    cid = t._id(case)
    if ids and not any(cid.startswith(i) for i in ids):
        continue
    nodeid = f"tests/test_gpu_chunked.py::test_chunked_kernel_matches_reference[{cid}]"
    torch.manual_seed(zlib.crc32(nodeid.encode()))
    args, weights, st, mem, cu = t._case(case)
    o, s = neural_memory(*args, weights, initial_state=st, output_final_state=True, backend="cuda", cu_seqlens=cu, **mem)
    (o_ref, s_ref), (o32, s32) = t._references(args, weights, st, mem, cu)
    ours = [rel_err(o, o_ref)] + [rel_err(a, b) for a, b in zip(s.weights + s.momentum, s_ref.weights + s_ref.momentum)]
    f32 = [rel_err(o32, o_ref)] + [rel_err(a, b) for a, b in zip(s32.weights + s32.momentum, s_ref.weights + s_ref.momentum)]
    tol = t.TOL[args[0].dtype]
    if max(ours) < 0.3 * tol:
        continue
    print(cid, "ours", " ".join(f"{e:.1e}" for e in ours), "| fp32 ref", " ".join(f"{e:.1e}" for e in f32), flush=True)
