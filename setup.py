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
    DIVCO_BUILD_DIR     the persistent build cache (default: build/native in the source folder)
By default the CUDA kernels are compiled when torch is a CUDA build and a toolkit is found.

Rebuilds are cached: the objects live in DIVCO_BUILD_DIR/<key>, where the key hashes the torch
version, the compiler flags and the build environment, so ninja recompiles only what changed; a
finished module whose sources (contents) are unchanged is reused without compiling or linking.
Beside the module, _C_build.json records the torch / CUDA versions it was built against
(divco.native checks it before importing divco._C).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    print(f"divco setup: {message}", file=sys.stderr, flush=True)


def describe_build(ext) -> str:
    """What compiling ``ext`` builds, in words: its kernels, source counts and CUDA archs."""
    cuda = [s for s in ext.sources if str(s).endswith(".cu")]
    cpp = len(ext.sources) - len(cuda)
    kernels = "CPU and CUDA kernels" if cuda else "CPU kernels"
    archs = f", TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}" if cuda else ""
    sources = f"{cpp} C++ source{'s' if cpp != 1 else ''}" + (f" and {len(cuda)} CUDA sources" if cuda else "")
    return f"{kernels} from {sources}{archs}, {os.environ.get('MAX_JOBS', 'all')} parallel jobs"


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
HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inc")


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


BUILD_RECORD_NAME = "_C_build.json"  # read by divco/native.py
# Build-environment variables that change the compiled code without appearing in the flags.
KEY_ENVIRONMENT = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST",
                   "NVCC_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS")
KEPT_BUILD_DIRS = 4  # older keys' build folders are removed


def file_digest(paths: list[str]) -> str:
    """SHA-256 of the files' names and contents (the sources and every header they may include)."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(path.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return digest.hexdigest()


def configuration_key(extension, torch_version: str, torch_cuda_version: str | None) -> str:
    """What decides the objects besides the source contents: torch, flags, environment, Python."""
    described = {
        "torch": torch_version,
        "torch_cuda": torch_cuda_version,
        "python": sys.version,
        "platform": sys.platform,
        "extension": extension.name,
        "sources": list(extension.sources),
        "include_dirs": list(extension.include_dirs),
        "define_macros": [list(m) for m in extension.define_macros],
        "extra_compile_args": extension.extra_compile_args,
        "extra_link_args": list(extension.extra_link_args),
        "libraries": list(extension.libraries),
        "library_dirs": list(extension.library_dirs),
        "environment": {name: os.environ.get(name) for name in KEY_ENVIRONMENT},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_cache_root(root: Path = ROOT) -> Path:
    return Path(os.environ.get("DIVCO_BUILD_DIR") or root / "build" / "native").resolve()


def prune_build_dirs(cache_root: Path, keep: int = KEPT_BUILD_DIRS) -> None:
    """Remove all but the ``keep`` most recently used key folders (each holds a full build)."""
    folders = sorted((p for p in cache_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in folders[keep:]:
        shutil.rmtree(stale, ignore_errors=True)


def copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def torch_version_defines(torch_version: str, torch_cuda_version: str | None) -> list[str]:
    """-D flags that let divco._C.build_info() report the torch (and its CUDA) it was built against.

    module.cpp stringifies them, so only characters that are plain preprocessor tokens pass.
    """
    defines = []
    for name, value in (("DIVCO_TORCH_VERSION", torch_version), ("DIVCO_TORCH_CUDA_VERSION", torch_cuda_version)):
        if value is None:
            continue
        if not re.fullmatch(r"[A-Za-z0-9._+]+", value):
            raise RuntimeError(f"cannot record {name}={value!r} in the build: expected letters, digits, '.', '_', '+'")
        defines.append(f"-D{name}={value}")
    return defines


def with_build_cache(build_ext_class: type) -> type:
    """``build_ext_class`` (torch's BuildExtension) with a persistent, keyed build folder.

    setuptools builds an editable install in a fresh temporary folder, so every
    `pip install -e` recompiled everything; here the objects stay in
    DIVCO_BUILD_DIR/<configuration key>/ (ninja recompiles the changed sources only), and a
    module built from the same source contents is copied back without compiling or linking.
    """

    class CachedBuildExtension(build_ext_class):
        def build_extension(self, ext) -> None:
            import torch

            key = configuration_key(ext, torch.__version__, torch.version.cuda)
            folder = build_cache_root() / key
            folder.mkdir(parents=True, exist_ok=True)
            os.utime(folder)  # most recently used, for pruning
            sources_digest = file_digest(list(ext.sources) + list(ext.depends))
            output = Path(self.get_ext_fullpath(ext.name))
            cached = folder / output.name
            digest_file = folder / "sources.sha256"
            if cached.exists() and digest_file.exists() and digest_file.read_text().strip() == sources_digest:
                log(f"{ext.name}: sources, torch and flags unchanged, reusing {cached}")
                copy_atomically(cached, output)
            else:
                log(f"{ext.name}: compiling in {folder}: {describe_build(ext)} (minutes from scratch, silent until "
                    f"it links; later builds recompile only what changed)")
                self.build_temp = str(folder / "objects")
                digest_file.unlink(missing_ok=True)  # a build that fails leaves no stale claim
                super().build_extension(ext)
                copy_atomically(output, cached)
                digest_file.write_text(sources_digest + "\n")
            self.write_build_record(ext, output.with_name(BUILD_RECORD_NAME), key, sources_digest)
            prune_build_dirs(folder.parent)

        def write_build_record(self, ext, path: Path, key: str, sources_digest: str) -> None:
            import torch

            record = {
                "extension": ext.name,
                "torch_version": torch.__version__,
                "torch_cuda_version": torch.version.cuda,
                "cuda_kernels": any(s.endswith(".cu") for s in ext.sources),
                "configuration_key": key,
                "sources_sha256": sources_digest,
                "extra_compile_args": ext.extra_compile_args,
            }
            path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

        def copy_extensions_to_source(self) -> None:
            """Editable installs: the build record goes beside the module copied into the sources."""
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                record = Path(regular_file).with_name(BUILD_RECORD_NAME)
                if record.exists():
                    copy_atomically(record, Path(inplace_file).with_name(BUILD_RECORD_NAME))

    return CachedBuildExtension


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
    version_defines = torch_version_defines(torch.__version__, torch.version.cuda)
    cxx_flags += version_defines
    nvcc_flags += version_defines
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
    extension.depends = [str(p.relative_to(ROOT)) for p in sorted(CSRC.rglob("*")) if p.suffix in HEADER_SUFFIXES]
    return [extension], {"build_ext": with_build_cache(BuildExtension).with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = native_extensions()
    setup(
        packages=find_packages(include=["divco", "divco.*"]) + ["divco.kernels"],
        package_dir={"divco.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
