"""divco.native: the build record beside divco._C is checked against the running torch before
the module is imported; a mismatch or a loader failure warns clearly and divco runs without it."""

import json

import pytest
import torch

from divco import native as loader
from divco.ops import backends


@pytest.fixture
def fresh_loader(monkeypatch):
    """load_extension() runs again (its result is cached per process)."""
    monkeypatch.setattr(loader, "_loaded", None)
    return loader


def reprobe_backends(monkeypatch):
    """The backends' import-time decision about divco._C, taken again from the loader's answer."""
    loaded, reason, has_cuda = backends._probe_native()
    monkeypatch.setattr(backends, "_NATIVE_LOADED", loaded)
    monkeypatch.setattr(backends, "_NATIVE_REASON", reason)
    monkeypatch.setattr(backends, "_NATIVE_HAS_CUDA", has_cuda)


def write_record(path, torch_version, torch_cuda_version):
    path.write_text(json.dumps({"torch_version": torch_version, "torch_cuda_version": torch_cuda_version}))
    return path


def test_a_record_of_this_torch_allows_loading():
    assert loader.build_mismatch({"torch_version": "2.14.1+cu130", "torch_cuda_version": "13.0"},
                                 "2.14.1+cu130", "13.0") == ""
    assert loader.build_mismatch(None, "2.14.1", None) == ""  # no record (CMake build): just try


@pytest.mark.parametrize("built, running", [
    (("2.14.1+cu130", "13.0"), ("2.13.0+cpu", None)),   # the case: CUDA build, CPU-only torch
    (("2.13.0+cpu", None), ("2.14.1+cu130", "13.0")),
    (("2.14.1+cu126", "12.6"), ("2.14.1+cu130", "13.0")),  # same release, another CUDA
])
def test_a_record_of_another_torch_names_both_and_the_rebuild(built, running):
    reason = loader.build_mismatch({"torch_version": built[0], "torch_cuda_version": built[1]}, *running)
    assert f"built against torch {built[0]}" in reason and f"torch {running[0]}" in reason
    assert "pip install --no-build-isolation -e ." in reason


def test_mismatched_build_is_not_imported_and_warns(fresh_loader, monkeypatch, tmp_path):
    record = write_record(tmp_path / "_C_build.json", "1.0.0+cu000", "0.0")
    monkeypatch.setattr(loader, "BUILD_RECORD", record)
    imported = []
    monkeypatch.setattr(loader.importlib, "import_module", lambda name: imported.append(name))
    with pytest.warns(RuntimeWarning, match=r"built against torch 1\.0\.0\+cu000 .* torch " + torch.__version__.replace("+", r"\+")):
        module, reason = loader.load_extension()
    assert module is None and imported == []
    # Asking for the native backends then fails with that reason (never a silent fallback).
    reprobe_backends(monkeypatch)
    with pytest.raises(ValueError, match="built against torch 1.0.0"):
        backends.resolve_backend("cpu", torch.device("cpu"), torch.float32)
    assert backends.resolve_backend(None, torch.device("cpu"), torch.float32) == "torch"


def test_loader_failure_becomes_a_warning_with_the_rebuild_hint(fresh_loader, monkeypatch, tmp_path):
    """What a CUDA build of divco._C does beside a CPU-only torch: the dynamic loader fails."""
    (tmp_path / "divco_fake_native.py").write_text(
        "raise ImportError('libc10_cuda.so: cannot open shared object file: No such file or directory')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(loader, "EXTENSION", "divco_fake_native")
    monkeypatch.setattr(loader, "BUILD_RECORD", tmp_path / "absent.json")
    with pytest.warns(RuntimeWarning, match=r"libc10_cuda\.so.*pip install --no-build-isolation -e \."):
        module, reason = loader.load_extension()
    assert module is None and "built against another torch" in reason


def test_an_extension_that_is_not_built_is_silent(fresh_loader, monkeypatch, tmp_path, recwarn):
    monkeypatch.setattr(loader, "EXTENSION", "divco_native_that_does_not_exist")
    monkeypatch.setattr(loader, "BUILD_RECORD", tmp_path / "absent.json")
    module, reason = loader.load_extension()
    assert module is None and "is not built" in reason
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_unreadable_record_is_refused(fresh_loader, monkeypatch, tmp_path):
    record = tmp_path / "_C_build.json"
    record.write_text("{not json")
    monkeypatch.setattr(loader, "BUILD_RECORD", record)
    with pytest.warns(RuntimeWarning, match="no usable build record"):
        assert loader.load_extension()[0] is None


def test_build_info_reports_the_torch_it_was_compiled_against(native):
    info = native.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda_version"] == torch.version.cuda


def test_build_record_beside_the_module_matches_it(native):
    from divco.native import read_build_record

    record = read_build_record()
    if record is None:
        pytest.skip("divco._C has no build record (built by CMake or copied in)")
    info = native.build_info()
    assert (record["torch_version"], record["torch_cuda_version"]) == (info["torch_version"], info["torch_cuda_version"])
    assert record["cuda_kernels"] == bool(info["cuda_kernels"])
