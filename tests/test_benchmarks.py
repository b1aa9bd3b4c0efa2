"""benchmarks/run.py on the CPU: its arguments and the JSON it writes (timing replaced by one
real call of each method, so the benchmark's code paths run)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import run  # noqa: E402


def test_benchmark_run_times_several_shapes_in_one_process(tmp_path, monkeypatch):
    """run.py --shape takes several shapes and writes one bench.json with a row per method,
    pass and shape (here the tiny CPU shape twice: on a CPU the reference and the parallel
    variant; on a GPU also the fused op and SDPA, as methods_for lists them)."""
    monkeypatch.setattr(run, "time_fn", lambda fn, device: (fn(), (1.0, None))[1])
    if torch.cuda.is_available():  # the fused op takes bf16 and D >= 32: a GPU-sized "cpu" shape
        monkeypatch.setitem(run.SHAPES, "cpu", run.Shape("cpu", B=1, T=256, H=2, D=32, hidden=64,
                                                         chunk=16))
    assert run.main(["--memory", "--no-sweep", "--no-titans-pytorch", "--shape", "cpu", "cpu",
                     "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    got = sorted((r["method"], r["pass_"]) for r in rows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    want = sorted({(m, run._pass_name(bwd, extra))
                   for m, _, bwd, extra in run.methods_for(device, include_titans=False)})
    assert ("reference", "fwd") in want and ("parallel (ours)", "fwd+bwd") in want
    assert got == sorted(want * 2)
    assert all(r["shape"] == "cpu" and r["ms"] == 1.0 for r in rows)
