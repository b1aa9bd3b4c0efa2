"""benchmarks/wgmma_probe.cu compiles for sm_90a as written: csrc/common/wgmma.cuh's helpers
become one HGMMA per wgmma call, with no waits or fences that ptxas injects (C7517 / C7519: its
"warpgroup.wait / warpgroup.arrive is injected" notes, which serialize the products), and no
spills. Needs nvcc (CI has it; no GPU). The probe's numbers come from running it on an H100
(docs/perf_notes.md v17)."""
import os
import shutil
import subprocess

import pytest

from test_build import _cuobjdump

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ways 2 and 3 (m64n16k16) and way 4 (m64n32k16): 3 products x 4 k steps x 3 plane pairs each
EXPECTED_HGMMA = 3 * 36


@pytest.fixture(scope="module")
def probe_build(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not available")
    exe = str(tmp_path_factory.mktemp("probe") / "wgmma_probe")
    res = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
         "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "benchmarks", "wgmma_probe.cu"),
         "-o", exe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe, res.stderr


def test_probe_wgmma_not_serialized_and_no_spills(probe_build):
    _, log = probe_build
    for note in ("C7517", "C7519", "serialized"):
        assert note not in log, [l for l in log.splitlines() if note in l]
    spills = [l for l in log.splitlines() if "spill stores" in l]
    assert len(spills) == 7, log  # one line per way
    assert all("0 bytes spill stores, 0 bytes spill loads" in l for l in spills), spills


def test_probe_ptx_has_every_wgmma(probe_build):
    nvcc = shutil.which("nvcc")
    ptx = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=compute_90a", "-ptx",
         "-I", os.path.join(ROOT, "csrc"), os.path.join(ROOT, "benchmarks", "wgmma_probe.cu"),
         "-o", "-"], capture_output=True, text=True, check=True).stdout
    assert ptx.count("wgmma.mma_async") == EXPECTED_HGMMA


def test_probe_issues_one_hgmma_per_wgmma(probe_build):
    exe, _ = probe_build
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not available")
    res = subprocess.run([tool, "-sass", exe], capture_output=True, text=True)
    if res.returncode != 0 and "nvdisasm" in res.stderr:
        pytest.skip("cuobjdump found no nvdisasm (the pip cuobjdump wheel ships without it)")
    assert res.returncode == 0, res.stderr
    assert sum("HGMMA" in l for l in res.stdout.splitlines()) == EXPECTED_HGMMA
