"""The CUDA kernels compiled for sm_80 and sm_90 with `nvcc -Xptxas -v` (no GPU needed): no
instantiation spills registers, and the ensemble kernels' static shared memory fits the
reserve their branch limit assumes (csrc/divco/ops/cuda/launchers.h). Run as a script to
print the register / spill / shared-memory report of every kernel instantiation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = (80, 90)
# csrc/divco/ops/cuda/launchers.h: kEnsembleStaticSharedBytes
ENSEMBLE_STATIC_SHARED_BYTES = 1024

pytestmark = pytest.mark.slow


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compile_report(nvcc: str, source: str, arch: int, out_dir: Path) -> list[dict]:
    """One record per kernel: name, arch, registers, spill_stores, spill_loads, smem."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    config = json.loads((CSRC / "build_config.json").read_text())
    # The flags of the real build (setup.py: torch's common nvcc flags, then build_config's).
    command = [nvcc, "-std=c++17", "-c", str(CSRC / source), "-o", str(out_dir / f"{Path(source).stem}_{arch}.o")]
    command += list(COMMON_NVCC_FLAGS) + config["nvcc_flags"] + [f"-D{d}" for d in config["cuda_defines"]]
    command += [f"-I{CSRC}"] + [f"-I{p}" for p in include_paths()]
    command += [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records, current = [], None
    for line in result.stderr.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if entry:
            current = {"name": demangle(entry.group(1)), "arch": int(entry.group(2)), "source": source}
            continue
        if current is None:
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill:
            current["spill_stores"], current["spill_loads"] = int(spill.group(1)), int(spill.group(2))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
            records.append(current)
            current = None
    return records


def demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    text = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()
    text = re.sub(r"divco::ops::cuda::\(anonymous namespace\)::", "", text)
    return re.sub(r"\(divco::ops::\w+\)", "", text)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc: the CUDA kernels cannot be compiled here")
    sources = [s for s in json.loads((CSRC / "build_config.json").read_text())["sources"]["cuda"] if s.endswith(".cu")]
    out_dir = tmp_path_factory.mktemp("ptxas")
    jobs = [(s, a) for s in sources for a in ARCHS]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        parts = pool.map(lambda job: compile_report(nvcc, job[0], job[1], out_dir), jobs)
    return [record for part in parts for record in part]


def test_every_kernel_instantiation_is_compiled_for_each_arch(report):
    for arch in ARCHS:
        names = [r["name"] for r in report if r["arch"] == arch]
        # cotrain rows: 3 dtypes x 4 branch counts; ensemble forward: 3 dtypes; backward: 3 dtypes,
        # unweighted and weighted
        assert sum("cotrain_rows_kernel" in n for n in names) == 12, names
        assert sum("ensemble_kernel" in n for n in names) == 3, names
        assert sum("ensemble_backward_kernel" in n for n in names) == 6, names


def test_no_kernel_spills_registers(report):
    spilling = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(format_record(r) for r in spilling)


def test_ensemble_static_shared_memory_fits_the_branch_limit_reserve(report):
    ensemble = [r for r in report if "ensemble" in r["name"]]
    assert ensemble
    assert all(r["smem"] <= ENSEMBLE_STATIC_SHARED_BYTES for r in ensemble), [format_record(r) for r in ensemble]


def format_record(r: dict) -> str:
    return (
        f"sm_{r['arch']} {r['registers']:4d} regs  spill {r['spill_stores']}/{r['spill_loads']} B  "
        f"smem {r['smem']:5d} B  {r['name']}"
    )


if __name__ == "__main__":
    import tempfile

    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("no nvcc found")
    sources = [s for s in json.loads((CSRC / "build_config.json").read_text())["sources"]["cuda"] if s.endswith(".cu")]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(s, a) for s in sources for a in ARCHS]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for part in pool.map(lambda job: compile_report(nvcc, job[0], job[1], Path(tmp)), jobs):
                for record in part:
                    print(format_record(record))
