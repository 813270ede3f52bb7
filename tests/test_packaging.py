"""What users install: torchvision is optional, no extra but vision/bench depends on torch, and
the sdist holds every test, benchmark and script the README refers to."""

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Packages whose wheels require (and so may replace) a particular torch.
TORCH_PINNING = {"torch", "torchvision", "torchaudio", "torch-uncertainty", "lightning", "pytorch-lightning",
                 "torchmetrics", "timm"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_torchvision_is_not_a_dependency_but_the_vision_extra():
    """torchvision>=0.20 as a dependency replaced a CPU-only torch with a CUDA one."""
    project = PYPROJECT["project"]
    assert {requirement_name(r) for r in project["dependencies"]} & TORCH_PINNING == {"torch"}
    assert [requirement_name(r) for r in project["optional-dependencies"]["vision"]] == ["torchvision"]


@pytest.mark.parametrize("extra", ["test", "data"])
def test_extras_never_pull_another_torch(extra):
    names = {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]}
    assert not names & TORCH_PINNING, names & TORCH_PINNING


def test_bench_extra_installs_what_packed_ensembles_and_the_plots_import():
    names = {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["bench"]}
    # torch_uncertainty's packed models import these at import time (found with sys.modules).
    assert {"torch-uncertainty", "lightning", "torchmetrics", "rich", "scipy", "einops", "matplotlib",
            "pytest-benchmark"} <= names
    assert any(r.startswith("divco[") and "vision" in r for r in PYPROJECT["project"]["optional-dependencies"]["bench"])


def test_divco_imports_and_builds_imagenet_models_without_torchvision():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"  # as if absent: `import torchvision` fails
        "import torch, divco\n"
        "model = divco.models.create('resnet18', num_classes=3, branches=2).eval()\n"
        "assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 3)\n"
        "try:\n"
        "    divco.unstack(model)\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'pip install "divco[vision]"' in result.stdout and "needs torchvision" in result.stdout


@pytest.mark.slow
def test_sdist_holds_every_test_benchmark_and_script(tmp_path):
    """The sdist once omitted 41 of 43 test files, bench/ and scripts/."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    tracked = subprocess.run(["git", "ls-files", "tests", "bench", "scripts", "csrc", "kernels", "docs"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    # A copy of the tracked files: the sdist must not depend on what lies untracked in the worktree.
    source = tmp_path / "source"
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True)
    source.mkdir()
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    committed = {p for p in tracked if (source / p).exists()}  # files added but not yet committed aside
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                            cwd=source, capture_output=True, text=True, timeout=600, check=False,
                            env={"DIVCO_NO_NATIVE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    [sdist] = (tmp_path / "dist").glob("divco-*.tar.gz")
    with tarfile.open(sdist) as archive_file:
        names = {name.split("/", 1)[1] for name in archive_file.getnames() if "/" in name}
    missing = sorted(committed - names)
    assert not missing, missing
    assert {"README.md", "LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in", "CMakeLists.txt"} <= names


def test_readme_cmake_commands_are_plain_shell():
    """The documented CMake lines are shell as written (a literal `AUTO|ON|OFF` once piped in a shell)."""
    readme = (ROOT / "docs" / "INSTALL.md").read_text()
    [block] = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "cmake -S" in b]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert [c for c in commands if c.startswith("cmake")] == [
        "cmake -S . -B build/cmake -G Ninja -DDIVCO_CUDA=AUTO", "cmake --build build/cmake"]
    assert not [c for c in commands if "|" in c]
    subprocess.run(["bash", "-n"], input=block, text=True, check=True)  # valid shell
