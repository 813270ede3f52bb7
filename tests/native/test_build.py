"""The native build: what divco._C contains, that its operators match the Python contract,
that divco works without it, the toolkit discovery of setup.py, and the CMake build."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divco.ops import schema

ROOT = Path(__file__).resolve().parents[2]
#: Every native operator, as build_info() lists it; registration.cpp defines all their schemas.
OPERATORS = ("cotrain_loss", "ensemble", "ensemble_backward", "batch_norm", "batch_norm_backward", "batch_norm_update_stats")


def load_setup_module():
    """setup.py's helpers, without running setup() (guarded by __name__ == "__main__")."""
    spec = importlib.util.spec_from_file_location("divco_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_toolkit_expected() -> bool:
    """setup.py compiles the CUDA kernels when nvcc is found and torch is a CUDA build."""
    if env_flag("DIVCO_NO_CUDA"):
        return False
    return env_flag("DIVCO_FORCE_CUDA") or (torch.version.cuda is not None and shutil.which("nvcc") is not None)


def test_cpu_kernels_are_registered(native):
    from divco.ops import backends

    assert backends.NATIVE_OPERATORS == OPERATORS  # what the stale-build probe checks
    info = native.build_info()
    names = [schema.op_name(base, "native") for base in OPERATORS]
    assert info["cpu_kernels"] == names
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"divco::{name}", "CPU"), name


@pytest.mark.parametrize("base", OPERATORS)
def test_schemas_equal_the_python_contract(native, base):
    """csrc/divco/ops/registration.cpp spells the schemas of divco/ops/schema.py."""
    op = getattr(torch.ops.divco, schema.op_name(base, "native")).default
    expected = torch._C.parse_schema(f"{schema.NAMESPACE}::{schema.full_schema(base, 'native')}")
    assert str(op._schema) == str(expected)


def test_cuda_kernels_are_compiled_when_a_toolkit_is_present(native):
    info = native.build_info()
    if not cuda_toolkit_expected():
        assert info["cuda_kernels"] == []
        pytest.skip("no CUDA toolkit (or DIVCO_NO_CUDA=1): a CPU-only build is expected")
    names = [schema.op_name(base, "native") for base in OPERATORS]
    assert info["cuda_kernels"] == names
    assert info["cuda_archs"], "no CUDA architecture compiled"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        assert info["cuda_archs"] == [800, 900]  # setup.py's default without a visible GPU
    major = int(torch.version.cuda.split(".")[0])
    assert info["cuda_runtime_version"] // 1000 == major, (info, torch.version.cuda)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"divco::{name}", "CUDA"), name


def test_cpu_kernels_have_an_avx2_clone_on_x86_64_linux(native):
    if not (sys.platform == "linux" and os.uname().machine == "x86_64"):
        pytest.skip("target_clones is only used on x86-64 Linux")
    assert native.build_info()["cpu_avx2_clone"] is True


def test_cpu_kernels_run_on_torchs_threads_on_linux(native):
    """Without -fopenmp, at::parallel_for (an OpenMP pragma in ATen's headers) runs one thread."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the OpenMP flags are only given on Linux")
    assert native.build_info()["cpu_openmp"] is True


def test_divco_imports_without_the_extension():
    """`import divco` never needs divco._C; the fused ops then fall back to torch / triton."""
    code = (
        "import sys; sys.modules['divco._C'] = None\n"  # makes `import divco._C` fail
        "import torch, divco, divco.ops\n"
        "assert 'cpu' not in divco.ops.available_backends('cpu'), divco.ops.available_backends('cpu')\n"
        "z = torch.randn(4, 2, 5, requires_grad=True)\n"
        "divco.ops.cotrain_loss(z, torch.tensor([0, 1, 2, 3])).loss.backward()\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# -- setup.py ---------------------------------------------------------------------------------


def test_no_native_builds_no_extension(monkeypatch):
    monkeypatch.setenv("DIVCO_NO_NATIVE", "1")
    assert load_setup_module().native_extensions() == ([], {})


def test_cuda_home_from_environment_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert load_setup_module().find_cuda_home() == tmp_path


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_toolkit_is_found_through_an_nvcc_wrapper_script(tmp_path):
    """A wrapper script `exec <toolkit>/bin/nvcc "$@"` on PATH says nothing by its location:
    setup.py asks the real driver for its folder."""
    setup_module = load_setup_module()
    real_home = setup_module.toolkit_from_nvcc(shutil.which("nvcc"))
    assert real_home is not None and (real_home / "bin" / "nvcc").exists()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real_home / "bin" / "nvcc"} "$@"\n')
    wrapper.chmod(0o755)
    assert setup_module.toolkit_from_nvcc(str(wrapper)) == real_home


def test_build_config_lists_existing_sources():
    import json

    config = json.loads((ROOT / "csrc" / "build_config.json").read_text())
    listed = {name for group in config["sources"].values() for name in group}
    on_disk = {
        str(path.relative_to(ROOT / "csrc")) for path in (ROOT / "csrc").rglob("*") if path.suffix in (".cpp", ".cu")
    }
    assert listed == on_disk  # every source is built, every listed source exists


# -- CMake ------------------------------------------------------------------------------------


# configure (the default, about 30 s): CMakeLists.txt reads build_config.json and finds torch;
# build: also compile, link and load the module (minutes with CUDA); off: skip.
CMAKE_TEST = os.environ.get("DIVCO_TEST_CMAKE", "configure").strip().lower()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake")
@pytest.mark.skipif(
    CMAKE_TEST not in ("configure", "build"),
    reason="DIVCO_TEST_CMAKE is not configure (the default) or build",
)
def test_cmake_builds_from_the_same_build_config(tmp_path):
    """Configure, and with DIVCO_TEST_CMAKE=build build and load, CMakeLists.txt."""
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            *generator,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    expected = "CPU and CUDA kernels" if cuda_toolkit_expected() else "CPU kernels only"
    assert expected in configure.stdout
    if CMAKE_TEST != "build":
        return
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=3600, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    module = next(build.glob("_C*.so"))
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('divco._C', {str(module)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.build_info()['cpu_kernels'])\n"
        "out = torch.ops.divco.cotrain_loss_native(\n"
        "    torch.randn(4, 2, 5), torch.arange(4), torch.tensor(0.5), None, 'js', 1.0, True)\n"
        "assert torch.isfinite(out[0])\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]


def test_cuda_library_headers_of_the_nvidia_wheels_are_found():
    """ATen's CUDA headers need cuBLAS/cuSPARSE headers: setup.py adds the nvidia wheels' folders."""
    if torch.version.cuda is None or importlib.util.find_spec("nvidia") is None:
        pytest.skip("torch is not a CUDA build with nvidia-* wheels")
    found = load_setup_module().nvidia_wheel_include_dirs()
    assert found
    for folder in found:
        assert any((Path(folder) / header).exists() for header in ("cublas_v2.h", "cusparse.h")), folder
