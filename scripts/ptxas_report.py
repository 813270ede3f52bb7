#!/usr/bin/env python3
"""Compile divco's CUDA kernels (csrc, the .cu files of csrc/build_config.json) with
``nvcc -Xptxas -v`` for sm_80 and sm_90, device code only (no GPU, no host compile), and
report registers, spills, stack and shared memory of every kernel instantiation.

    python scripts/ptxas_report.py [--arch 80 90] [--json FILE]

Exits 1 if a kernel spills or a file does not compile. tests/native/test_ptxas.py runs the
same compile (it skips where no nvcc is found).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
DEFAULT_CUDA_HOME = "/usr/local/cuda-13.0"


@dataclass
class KernelUsage:
    """One kernel instantiation's resources, as ptxas -v reports them."""

    arch: int
    source: str  # path relative to csrc
    mangled: str
    name: str  # demangled, without the anonymous namespace
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def find_nvcc() -> str | None:
    """nvcc of CUDA_HOME (default /usr/local/cuda-13.0), else the one on PATH."""
    for home in (os.environ.get("CUDA_HOME"), DEFAULT_CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build_config() -> dict:
    return json.loads((CSRC / "build_config.json").read_text())


def cuda_sources() -> list[Path]:
    """The .cu files of the build that define kernels (host wrappers and build_info.cu hold none)."""
    sources = [CSRC / s for s in build_config()["sources"]["cuda"] if s.endswith(".cu")]
    return [p for p in sources if "__global__" in p.read_text()]


def nvcc_command(nvcc: str, source: Path, arch: int, output: Path) -> list[str]:
    """The build's own flags (build_config.json and torch's CUDAExtension defaults), device only."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    config = build_config()
    includes = [str(CSRC / d) for d in config["include_dirs"]] + include_paths()
    flags = [f for f in config["nvcc_flags"] if f != "-lineinfo"]  # line info: irrelevant here
    return [nvcc, "-cubin", f"-arch=sm_{arch}", "-std=c++17", "-Xptxas", "-v", *flags, *COMMON_NVCC_FLAGS,
            *(f"-D{d}" for d in config["cuda_defines"]), *(f"-I{i}" for i in includes),
            str(source), "-o", str(output)]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    out = [re.sub(r"\(anonymous namespace\)::|_GLOBAL__N__\w+::", "", n) for n in out]
    return out if len(out) == len(names) else names


def parse_ptxas(text: str, source: str) -> list[KernelUsage]:
    """KernelUsage of every entry function in ptxas -v output."""
    entries: list[dict] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entries.append({"mangled": m.group(1), "arch": int(m.group(2))})
        elif entries and (m := _FRAME.search(line)):
            entries[-1].update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
        elif entries and (m := _USED.search(line)):
            entries[-1].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    names = demangle([e["mangled"] for e in entries])
    return [KernelUsage(e["arch"], source, e["mangled"], name, e.get("registers", -1), e.get("stack", 0),
                        e.get("stores", 0), e.get("loads", 0), e.get("smem", 0))
            for e, name in zip(entries, names)]


def compile_and_report(nvcc: str, source: Path, arch: int) -> list[KernelUsage]:
    """Compile one file for one arch; RuntimeError with nvcc's output if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(nvcc_command(nvcc, source, arch, Path(tmp) / "out.cubin"),
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{done.stdout}{done.stderr}"[-4000:])
    return parse_ptxas(done.stdout + done.stderr, str(source.relative_to(CSRC)))


def report_all(archs=(80, 90), jobs: int = 2) -> list[KernelUsage]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("no nvcc: set CUDA_HOME")
    work = [(s, a) for a in archs for s in cuda_sources()]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [k for ks in pool.map(lambda w: compile_and_report(nvcc, *w), work) for k in ks]


def format_table(kernels: list[KernelUsage]) -> str:
    lines = [f"{'arch':>6} {'regs':>5} {'spill st/ld B':>14} {'stack B':>8} {'smem B':>7}  kernel"]
    for k in kernels:
        lines.append(f"sm_{k.arch:<3} {k.registers:>5} {f'{k.spill_store_bytes}/{k.spill_load_bytes}':>14} "
                     f"{k.stack_bytes:>8} {k.shared_bytes:>7}  {k.name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    kernels = report_all(tuple(args.arch))
    print(format_table(kernels))
    spilled = [k for k in kernels if k.spills]
    print(f"{len(kernels)} kernel instantiations, {len(spilled)} spill")
    if args.json:
        args.json.write_text(json.dumps([asdict(k) for k in kernels], indent=1))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
