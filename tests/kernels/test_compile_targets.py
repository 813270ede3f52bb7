"""Every Triton kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed).

CI runs the kernels through Triton's interpreter, which never lowers them to PTX: a compile
error of one dtype or constexpr branch would first show on a GPU. scripts/triton_compile_report.py
compiles each specialisation the launchers use with triton.compile(ASTSource, GPUTarget("cuda",
cc, 32)) and reads registers and spills from the cubin. tests/conftest.py sets
TRITON_INTERPRET=1 for this process (and Triton then builds interpreted functions, its own
standard library included), so the compile runs in a subprocess without it.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "triton_compile_report.py"
_spec = importlib.util.spec_from_file_location("triton_compile_report", SCRIPT)
report = sys.modules.setdefault("triton_compile_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(report)

ARCHS = (80, 90)
COTRAIN_FLAGS = ("SOFT_TARGET", "KIND_KL", "UNIT_TEMPERATURE", "COMPUTE_GRAD", "SINGLE_TILE")
#: Tiles of up to this many branches must not spill (wider ones are reported only).
NO_SPILL_MAX_BLOCK_S = 16


def _kernel_names() -> set[str]:
    """The launchable kernels of every module of kernels/ (divco.kernels): names ending in _kernel."""
    import importlib

    names = set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        if path.stem != "__init__":
            module = importlib.import_module(f"divco.kernels.{path.stem}")
            names |= {name for name in vars(module) if name.endswith("_kernel")}
    return names


def test_plan_covers_every_kernel_dtype_and_flag():
    specs = report.plan()
    missing = _kernel_names() - {s.kernel for s in specs}
    assert not missing, f"add the specialisations of {sorted(missing)} to plan() in {SCRIPT.relative_to(REPO)}"
    for kernel in _kernel_names():
        assert {s.dtype for s in specs if s.kernel == kernel} == set(report.TRITON_DTYPES), kernel
    flag_sets = {tuple(dict(s.constexprs)[f] for f in COTRAIN_FLAGS)
                 for s in specs if s.kernel == "cotrain_loss_kernel" and s.dtype == "float32"}
    assert flag_sets == set(itertools.product((False, True), repeat=len(COTRAIN_FLAGS)))
    weighted = {tuple(dict(s.constexprs)[f] for f in ("SOFT_TARGET", "KIND_KL", "COMPUTE_GRAD", "SINGLE_TILE"))
                for s in specs if s.kernel == "cotrain_loss_kernel" and s.dtype == "float32"
                and dict(s.constexprs)["HAS_SAMPLE_WEIGHT"]}
    assert weighted == set(itertools.product((False, True), repeat=4))  # per-sample weights on every store path
    from divco.kernels.ensemble import MODE_IDS

    for kernel in ("ensemble_kernel", "ensemble_backward_kernel"):
        assert {dict(s.constexprs)["MODE"] for s in specs if s.kernel == kernel} == set(MODE_IDS.values())


def test_report_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2 and "TRITON_INTERPRET" in done.stderr


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", *map(str, ARCHS), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1500, cwd=REPO)
    print(done.stdout[-20000:])  # the register/spill table (pytest -s or -rA shows it)
    results = json.loads(out.read_text())["results"] if out.exists() else []
    failed = [f"sm_{r['arch']} {r['spec']}: {r['error']}" for r in results if not r["ok"]]
    assert done.returncode == 0 and not failed, "\n".join(failed) or done.stderr[-4000:]
    assert len(results) == len(report.plan()) * len(ARCHS)
    assert all(r["n_regs"] is not None for r in results), "cuobjdump gave no register counts"
    spilled = [f"sm_{r['arch']} {r['spec']}: {r['n_spills']} spills" for r in results
               if r["n_spills"] and r["constexprs"]["BLOCK_S"] <= NO_SPILL_MAX_BLOCK_S]
    assert not spilled, "\n".join(spilled)
