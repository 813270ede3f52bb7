"""The layout of csrc/: every op built alike (torchvision's csrc/ops pattern). registration.cpp
holds every schema and nothing else; each op's CPU kernel file and CUDA host file register its
implementation for their dispatch key; host checks live in op_common.cpp for every op; one
arg-max reduction for the CUDA kernels; comments name files that exist."""

import re
from pathlib import Path

import pytest

from divco.ops import backends

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
OPS = CSRC / "divco" / "ops"
#: The ops of the extension and their operators (an op's backward is an operator of the op).
OP_OPERATORS = {
    "cotrain_loss": ["cotrain_loss_native"],
    "ensemble": ["ensemble_native", "ensemble_backward_native"],
    "batch_norm": ["batch_norm_native", "batch_norm_backward_native", "batch_norm_update_stats_native"],
}


def impl_block(text: str, key: str) -> str:
    match = re.search(r"TORCH_LIBRARY_IMPL\(divco, " + key + r", m\) \{(.*?)\n?\}", text, re.S)
    return match.group(1) if match else ""


def test_registration_cpp_holds_every_schema_and_no_implementation():
    text = (OPS / "registration.cpp").read_text()
    defined = re.findall(r'm\.def\(\s*"(\w+)\(', text)
    assert defined == [name for names in OP_OPERATORS.values() for name in names]
    assert sorted(f"{op}_native" for op in backends.NATIVE_OPERATORS) == sorted(defined)
    assert "m.impl" not in text and "TORCH_LIBRARY_FRAGMENT" not in text
    assert "TORCH_LIBRARY_FRAGMENT" not in "".join(p.read_text() for p in CSRC.rglob("*.cpp"))


def test_the_one_cpp_autograd_node_has_its_own_file():
    """batch_norm_native's autograd is C++ (no Python per layer call), beside the kernels, not in
    registration.cpp; every other op's autograd is registered from Python."""
    autograd = [p.name for p in CSRC.rglob("*.cpp") if "TORCH_LIBRARY_IMPL(divco, Autograd" in p.read_text()]
    assert autograd == ["batch_norm_autograd.cpp"]
    assert impl_block((OPS / "batch_norm_autograd.cpp").read_text(), "Autograd").strip() == \
        'm.impl("batch_norm_native", &divco::ops::batch_norm_autograd);'


@pytest.mark.parametrize("op", OP_OPERATORS)
def test_each_kernel_file_registers_its_own_implementation(op):
    cpu = impl_block((OPS / "cpu" / f"{op}_kernel.cpp").read_text(), "CPU")
    cuda = impl_block((OPS / "cuda" / f"{op}_cuda.cpp").read_text(), "CUDA")
    for name in OP_OPERATORS[op]:
        assert f'm.impl("{name}"' in cpu, (op, name)
        assert f'm.impl("{name}"' in cuda, (op, name)
    assert (OPS / "cuda" / f"{op}_kernel.cu").exists()
    assert f"prepare_{op}(" in (OPS / "op_common.cpp").read_text()  # host checks: one place for every op


def test_sources_of_the_build_are_the_op_files():
    import json

    config = json.loads((CSRC / "build_config.json").read_text())
    for op in OP_OPERATORS:
        assert f"divco/ops/cpu/{op}_kernel.cpp" in config["sources"]["cpu"]
        assert f"divco/ops/cuda/{op}_cuda.cpp" in config["sources"]["cuda"]
        assert f"divco/ops/cuda/{op}_kernel.cu" in config["sources"]["cuda"]
    for kind in ("cpu", "cuda"):
        for source in config["sources"][kind]:
            assert (CSRC / source).exists(), source


def test_one_arg_max_reduction_for_the_cuda_kernels():
    sources = {p.name: p.read_text() for p in (OPS / "cuda").iterdir()}
    defining = [name for name, text in sources.items() if re.search(r"struct \w*(ArgMax|Top1)\b", text)]
    assert defining == ["block_reduce.cuh"]


def test_comments_name_files_that_exist():
    """A path in a comment (``ops_cuda.cpp``, ``divco/ops/fused.py``) names a file of the repo."""
    known = {p.name for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and "build" not in p.parts}
    missing = []
    for path in list(CSRC.rglob("*.h")) + list(CSRC.rglob("*.cpp")) + list(CSRC.rglob("*.cu")) + list(CSRC.rglob("*.cuh")):
        for line in path.read_text().splitlines():
            if "//" not in line:
                continue
            comment = line.split("//", 1)[1]
            for match in re.finditer(r"[\w./]+\.(?:py|h|cpp|cu|cuh)\b", comment):
                token = match.group(0)
                name = token.rsplit("/", 1)[-1]
                if comment[match.start() - 1: match.start()] in (">", "*") or name.startswith("."):
                    continue  # a pattern (cpu/<op>_kernel.cpp, cuda/*.cu), not a file
                if name not in known:
                    missing.append(f"{path.relative_to(ROOT)}: {token}")
    assert missing == []
