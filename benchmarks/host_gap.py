"""Where the benchmark table's synchronised timing (run.time_fn: one call between two CUDA
events, then a synchronisation) exceeds back-to-back timing (splits._time_ms: the GPU queue kept
full): the GPU's idle time inside one synchronised forward + backward of the table's
neural_memory call, from a torch.profiler trace. Prints, per shape, both timings, the call's
host time, the GPU busy time and the idle gaps longer than GAP_US with the kernels around them.
Needs a GPU and the built extension.

    SHAPES="short" python benchmarks/host_gap.py
    HOST_PROFILE=1 SHAPES="short" python benchmarks/host_gap.py   # + cProfile of one call
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import SHAPES  # noqa: E402
from run import bench_fused, time_fn  # noqa: E402
from splits import _time_ms  # noqa: E402


def gaps(fn, min_gap_us: float):
    """(busy us, span us, [(gap us, kernel before, kernel after)]) of one synchronised fn()."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"
                      and e.time_range.elapsed_us() > 0), key=lambda e: e.time_range.start)
    if not kernels:
        return 0.0, 0.0, []
    busy, out, end = 0.0, [], kernels[0].time_range.start
    prev = None
    for e in kernels:
        start, stop = e.time_range.start, e.time_range.end
        if prev is not None and start - end > min_gap_us:
            out.append((start - end, prev.name[:60], e.name[:60]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        prev = e
    return busy, end - kernels[0].time_range.start, out


def main():
    if not torch.cuda.is_available():
        sys.exit("benchmarks/host_gap.py needs a CUDA GPU")
    min_gap = float(os.environ.get("GAP_US", "20"))
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}: neural_memory backend='cuda' forward+backward "
          f"as the benchmark table calls it (run.bench_fused)")
    for name in os.environ.get("SHAPES", "short default").split():
        fn = bench_fused(SHAPES[name], dev, True)
        table_ms, _ = time_fn(fn, dev)
        b2b_ms = _time_ms(fn, reps=5)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3  # the call returns before the GPU is done
        torch.cuda.synchronize()
        busy, span, idle = gaps(fn, min_gap)
        print(f"{name}: table (synchronised, median) {table_ms:.2f} ms, back-to-back "
              f"{b2b_ms:.2f} ms, host time of a call {host_ms:.2f} ms; profiled call: GPU busy "
              f"{busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span, "
              f"{len(idle)} gaps > {min_gap:.0f} us")
        for g, before, after in sorted(idle, reverse=True)[:8]:
            print(f"  {g:8.1f} us idle  after {before}  before {after}")
        if os.environ.get("HOST_PROFILE"):  # where the call's host time goes (cProfile)
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            fn()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
