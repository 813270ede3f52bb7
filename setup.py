"""Build script: the Python package, the Triton kernels (kernels/ -> divco.kernels) and the
native extension divco._C (csrc/, described by csrc/build_config.json, which CMakeLists.txt
reads too).

    pip install --no-build-isolation -e .   # builds against the torch that is installed

Environment:
    DIVCO_NO_NATIVE=1   build no extension (pure Python install; divco falls back to the
                        torch and Triton backends)
    DIVCO_NO_CUDA=1     CPU kernels only
    DIVCO_FORCE_CUDA=1  compile the CUDA kernels even where torch sees no CUDA toolkit
    CUDA_HOME           the CUDA toolkit (default: found from the nvcc on PATH)
    TORCH_CUDA_ARCH_LIST  GPU architectures (default: the visible GPUs', else "8.0;9.0")
    MAX_JOBS            parallel compile jobs (ninja)
By default the CUDA kernels are compiled when torch is a CUDA build and a toolkit is found.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def log(message: str) -> None:
    print(f"divco setup: {message}", file=sys.stderr)


def toolkit_from_nvcc(nvcc: str) -> Path | None:
    """The CUDA toolkit folder of an nvcc found on PATH.

    nvcc may be a wrapper script (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`), so its own
    location says nothing: ask the real driver, whose dry run prints the folder it lives in.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cu"
        source.write_text("")
        try:
            result = subprocess.run(
                [nvcc, "-dryrun", "-c", str(source), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            result = None
    if result is not None:
        for line in (result.stdout + result.stderr).splitlines():
            # "#$ _HERE_=/usr/local/cuda-13.0/bin"
            key, _, value = line.removeprefix("#$ ").partition("=")
            if key.strip() == "_HERE_" and value.strip():
                home = Path(value.strip()).resolve().parent
                if (home / "include" / "cuda_runtime_api.h").exists():
                    return home
    home = Path(nvcc).resolve().parent.parent  # a real binary in <toolkit>/bin
    return home if (home / "include" / "cuda_runtime_api.h").exists() else None


def find_cuda_home() -> Path | None:
    """CUDA_HOME / CUDA_PATH if set, else the toolkit of the nvcc on PATH, else /usr/local/cuda."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return Path(os.environ[name])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = toolkit_from_nvcc(nvcc)
        if home is not None:
            return home
    default = Path("/usr/local/cuda")
    return default if (default / "bin" / "nvcc").exists() else None


CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h")


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on that hold the CUDA libraries'
    headers (nvidia/cu13/include; nvidia/cublas/include and nvidia/cusparse/include for
    CUDA 12): ATen's CUDA headers include cuBLAS/cuSPARSE headers a minimal toolkit lacks."""
    roots = [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    found: list[str] = []
    for root in roots:
        for include in sorted((root / "nvidia").glob("*/include")):
            if any((include / header).exists() for header in CUDA_LIBRARY_HEADERS) and str(include) not in found:
                found.append(str(include))
    return found


def native_extensions() -> tuple[list, dict]:
    """The divco._C extension and its build_ext command, or nothing when DIVCO_NO_NATIVE=1."""
    if env_flag("DIVCO_NO_NATIVE"):
        log("DIVCO_NO_NATIVE=1: building no native extension")
        return [], {}

    config = json.loads((CSRC / "build_config.json").read_text())
    want_cuda = not env_flag("DIVCO_NO_CUDA")
    cuda_home = find_cuda_home() if want_cuda else None
    if cuda_home is not None and "CUDA_HOME" not in os.environ:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = str(cuda_home)

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = False
    if env_flag("DIVCO_FORCE_CUDA"):
        if cuda_home is None:
            raise RuntimeError("DIVCO_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        with_cuda = True
    elif want_cuda:
        with_cuda = cuda_home is not None and torch.version.cuda is not None
        if not with_cuda:
            reason = "torch is not a CUDA build" if torch.version.cuda is None else "no CUDA toolkit found"
            log(f"CPU kernels only ({reason})")
    else:
        log("DIVCO_NO_CUDA=1: CPU kernels only")

    def paths(names: list[str]) -> list[str]:
        return [str((CSRC / name).relative_to(ROOT)) for name in names]

    sources = paths(config["sources"]["cpu"])
    include_dirs = [str(CSRC / d) for d in config["include_dirs"]]
    cxx_flags = list(config["cxx_flags"]) if sys.platform != "win32" else ["/O2"]
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        cxx_flags += config["openmp_flags"]
        link_flags += config["openmp_flags"]
    nvcc_flags = list(config["nvcc_flags"])
    try:
        import pybind11

        include_dirs.insert(0, pybind11.get_include())
    except ImportError:
        pass  # torch ships pybind11 headers too

    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = config["default_cuda_arch_list"]
        defines = [f"-D{d}" for d in config["cuda_defines"]]
        extension = CUDAExtension(
            config["extension"],
            sources + paths(config["sources"]["cuda"]),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
            extra_link_args=link_flags,
        )
        # After the toolkit's own include folder, which CUDAExtension put last.
        extension.include_dirs += nvidia_wheel_include_dirs()
        log(
            f"CPU and CUDA kernels (CUDA_HOME={os.environ.get('CUDA_HOME')}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})"
        )
    else:
        extension = CppExtension(
            config["extension"], sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = native_extensions()
    setup(
        packages=find_packages(include=["divco", "divco.*"]) + ["divco.kernels"],
        package_dir={"divco.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
