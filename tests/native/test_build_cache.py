"""setup.py's build cache: a second `pip install -e` with unchanged sources, torch and flags
compiles and links nothing; a changed header recompiles; other flags get their own folder.
(One test: every build starts a Python that imports torch.)

Checked on a one-file extension built by setup.py's own build_ext (the same class that builds
divco._C), so the test takes seconds rather than the minutes of the real extension."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

BUILD = textwrap.dedent("""
    import importlib.util, sys
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension
    spec = importlib.util.spec_from_file_location("divco_setup", sys.argv[1])
    divco_setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(divco_setup)
    setup(name="probe", ext_modules=[CppExtension("probe_ext", ["probe.cpp"], depends=["probe.h"])],
          cmdclass={"build_ext": divco_setup.with_build_cache(BuildExtension).with_options(use_ninja=True)},
          script_args=["-q", "build_ext", "--inplace"])
""")

SOURCE = textwrap.dedent("""
    #include <Python.h>
    #include "probe.h"
    static PyModuleDef probe_module = {PyModuleDef_HEAD_INIT, "probe_ext", nullptr, -1, nullptr};
    PyMODINIT_FUNC PyInit_probe_ext() {
      PyObject* m = PyModule_Create(&probe_module);
      PyModule_AddIntConstant(m, "value", PROBE_VALUE);
      return m;
    }
""")


def build(folder: Path, cache: Path, **env) -> str:
    result = subprocess.run(
        [sys.executable, "build.py", str(ROOT / "setup.py")], cwd=folder, capture_output=True, text=True,
        timeout=600, check=False, env={**os.environ, "DIVCO_BUILD_DIR": str(cache), "MAX_JOBS": "1", **env},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr


def probe_value(folder: Path) -> int:
    out = subprocess.run([sys.executable, "-c", "import probe_ext; print(probe_ext.value)"], cwd=folder,
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout)


def objects(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*.o")}


@pytest.fixture
def probe(tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "build.py").write_text(BUILD)
    (folder / "probe.cpp").write_text(SOURCE)
    (folder / "probe.h").write_text("#define PROBE_VALUE 1\n")
    return folder, tmp_path / "cache"


def test_unchanged_build_reuses_everything_changes_recompile(probe):
    folder, cache = probe
    log = build(folder, cache)
    assert "compiling in" in log and probe_value(folder) == 1
    assert "probe_ext: compiling in" in log and ": CPU kernels from 1 C++ source, 1 parallel jobs (minutes" in log, log
    first = objects(cache)
    assert len(first) == 1, first
    record = json.loads((folder / "_C_build.json").read_text())  # beside the in-place module
    assert (record["torch_version"], record["torch_cuda_version"]) == (torch.__version__, torch.version.cuda)

    log = build(folder, cache)
    assert "unchanged, reusing" in log and "compiling in" not in log
    assert objects(cache) == first  # not one object rewritten
    assert probe_value(folder) == 1

    (folder / "probe.h").write_text("#define PROBE_VALUE 2\n")  # a header the source includes
    log = build(folder, cache)
    assert "compiling in" in log and probe_value(folder) == 2
    [(path, mtime)] = objects(cache).items()
    assert path in first and mtime > first[path]  # recompiled in the same folder (ninja)

    log = build(folder, cache, CXXFLAGS="-DPROBE_UNUSED=1")  # other flags: their own folder
    assert "compiling in" in log
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2 and len(objects(cache)) == 2
