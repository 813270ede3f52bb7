#!/usr/bin/env python3
"""Compile every Triton kernel of divco ahead of time for sm_80 and sm_90, without a GPU.

The kernels' launchers (divco.ops.triton_backend) specialise each kernel on dtypes and
constexprs; Triton's interpreter (what CI runs) never lowers them to PTX, so a kernel that
only fails in the compiler (a type error in one branch of a constexpr, a layout the backend
rejects, a shared-memory overflow) would surface on the first GPU run. This script compiles
the specialisations the launchers use with ``triton.compile(ASTSource, GPUTarget("cuda", cc,
32))`` and reports registers and spills of each (read from the cubin with cuobjdump, as
Triton's driver reads them at load time: n_spills = local memory bytes / 4).

It must run WITHOUT TRITON_INTERPRET (under it, triton.jit and Triton's own standard library
produce interpreted functions, which cannot be compiled): the test runs it in a subprocess.

    python scripts/triton_compile_report.py [--arch 80 90] [--json FILE] [--jobs 2] [--quick]

Prints one line per compiled specialisation; exits 1 if any compile failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: Scalar arguments that are floats; every other non-pointer, non-constexpr argument is an int32.
FLOAT_SCALARS = {"inv_t", "cot_coef", "temperature", "eps", "momentum", "count", "unbias"}
#: The branch counts and class counts whose tile shapes are compiled (the launchers' tile_shape
#: turns them into BLOCK_S x BLOCK_K and num_warps): from one branch to wide ensembles, from
#: CIFAR-10 to K past one tile.
BRANCHES = (1, 4, 16, 64)
CLASSES = (10, 40000)


@dataclass(frozen=True)
class Spec:
    """One specialisation of one kernel, as a launcher would launch it."""

    kernel: str  # "cotrain_loss_kernel", ...
    dtype: str  # logits dtype (torch name)
    constexprs: tuple  # ((name, value), ...) in kernel argument order
    num_warps: int
    pointer_dtypes: tuple = ()  # ((arg name, triton dtype), ...) overriding the default

    def label(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        extra = "".join(f",{k}:{v}" for k, v in self.pointer_dtypes)
        return f"{self.kernel}[{self.dtype},{flags},warps={self.num_warps}{extra}]"


@dataclass
class Result:
    spec: Spec
    arch: int
    ok: bool
    seconds: float
    n_regs: int | None = None
    n_spills: int | None = None  # local memory bytes / 4, like triton's CompiledKernel.n_spills
    shared: int | None = None
    error: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.label()
        d["kernel"] = self.spec.kernel
        d["dtype"] = self.spec.dtype
        d["constexprs"] = dict(self.spec.constexprs)
        d["num_warps"] = self.spec.num_warps
        return d


# -- the plan: what the launchers launch -------------------------------------------------------


def _tile_shapes(tile_shape) -> list[tuple[int, int, int, int]]:
    """(S, K, BLOCK_S, BLOCK_K, num_warps) for every distinct tile the launchers pick."""
    seen, shapes = set(), []
    for S in BRANCHES:
        for K in CLASSES:
            block_s, block_k, warps = tile_shape(S, K)
            key = (block_s, block_k, warps, K <= block_k)
            if key not in seen:
                seen.add(key)
                shapes.append((S, K, block_s, block_k, warps))
    return shapes


def plan(quick: bool = False) -> list[Spec]:
    """Every kernel x dtype x constexpr specialisation worth compiling.

    - cotrain_loss_kernel: every combination of its five boolean constexprs in float32 at the
      S=4, K=1000 tile, and with per-sample weights (HAS_SAMPLE_WEIGHT) every combination of the
      four that change what is stored (target kind, "js"/"kl", gradient, tiles); bfloat16/float16 on each load/store path (hard/soft target, with and
      without gradient, one tile or several; also with a float32 gradient buffer); the
      heaviest flags ("js", T != 1, gradient) at every distinct tile shape.
    - ensemble kernels (forward, backward): every mode in float32, every weighted mode with
      weights, and a normalised and a plain mode in bfloat16/float16 at the S=4, K=1000 tile; mean_probs (per-branch online softmax,
      the most registers) at every distinct tile shape.
    ``quick`` keeps only the first two groups of each (for a smoke run)."""
    from divco.kernels import ensemble as ensemble_module
    from divco.ops.triton_backend import tile_shape
    from divco.vocabulary import WEIGHTED_ENSEMBLE_MODES

    specs: list[Spec] = []
    base_s, base_k, base_warps = tile_shape(4, 1000)
    flag_names = ("SOFT_TARGET", "KIND_KL", "UNIT_TEMPERATURE", "COMPUTE_GRAD", "SINGLE_TILE")

    def cotrain(dtype, flags: dict, block_s, block_k, warps, grad_dtype=None):
        flags = dict(flags, HAS_SAMPLE_WEIGHT=flags.get("HAS_SAMPLE_WEIGHT", False))
        consts = tuple((n, flags[n]) for n in flag_names + ("HAS_SAMPLE_WEIGHT",))
        consts += (("BLOCK_S", block_s), ("BLOCK_K", block_k))
        pointers = (("grad_ptr", TRITON_DTYPES[grad_dtype]),) if grad_dtype else ()
        specs.append(Spec("cotrain_loss_kernel", dtype, consts, warps, pointers))

    for values in itertools.product((False, True), repeat=len(flag_names)):
        cotrain("float32", dict(zip(flag_names, values)), base_s, base_k, base_warps)
    for soft, kl, grad, single in itertools.product((False, True), repeat=4):  # per-sample weights
        flags = dict(SOFT_TARGET=soft, KIND_KL=kl, UNIT_TEMPERATURE=False, COMPUTE_GRAD=grad, SINGLE_TILE=single,
                     HAS_SAMPLE_WEIGHT=True)
        cotrain("float32", flags, base_s, base_k, base_warps)
    for dtype in ("bfloat16", "float16"):
        # the dtype changes loads and stores only: each path that loads or stores once
        paths = ((False, True, False), (True, True, True), (False, False, True), (True, False, False))
        for soft, grad, single in paths:
            flags = dict(SOFT_TARGET=soft, KIND_KL=False, UNIT_TEMPERATURE=False, COMPUTE_GRAD=grad,
                         SINGLE_TILE=single)
            cotrain(dtype, flags, base_s, base_k, base_warps)
        # a float32 gradient buffer for reduced-precision logits
        cotrain(dtype, dict(SOFT_TARGET=False, KIND_KL=False, UNIT_TEMPERATURE=False, COMPUTE_GRAD=True,
                            SINGLE_TILE=False), base_s, base_k, base_warps, grad_dtype="float32")
        # per-sample weights: the weight load and the scaled stores in this dtype
        cotrain(dtype, dict(SOFT_TARGET=True, KIND_KL=True, UNIT_TEMPERATURE=False, COMPUTE_GRAD=True,
                            SINGLE_TILE=False, HAS_SAMPLE_WEIGHT=True), base_s, base_k, base_warps)
    if not quick:
        for S, K, block_s, block_k, warps in _tile_shapes(tile_shape):
            flags = dict(SOFT_TARGET=False, KIND_KL=False, UNIT_TEMPERATURE=False, COMPUTE_GRAD=True,
                         SINGLE_TILE=K <= block_k)
            cotrain("float32", flags, block_s, block_k, warps)

    modes = dict(ensemble_module.MODE_IDS)
    normalised = ensemble_module.NORMALISED_MODES
    for kernel in ("ensemble_kernel", "ensemble_backward_kernel"):
        def ensemble(dtype, mode, block_s, block_k, warps, weighted=False):
            consts = (("MODE", modes[mode]), ("NORMALISED", mode in normalised), ("HAS_WEIGHTS", weighted),
                      ("BLOCK_S", block_s), ("BLOCK_K", block_k))
            specs.append(Spec(kernel, dtype, consts, warps))

        for mode in modes:
            ensemble("float32", mode, base_s, base_k, base_warps)
        for mode in WEIGHTED_ENSEMBLE_MODES:  # per-branch weights (the max modes take none)
            ensemble("float32", mode, base_s, base_k, base_warps, weighted=True)
        for dtype in ("bfloat16", "float16"):  # loads/stores: a normalised mode and a plain one
            for mode in ("mean_probs", "max"):
                ensemble(dtype, mode, base_s, base_k, base_warps)
        if not quick:  # the tiles with the heaviest mode (per-branch online softmax)
            for _, _, block_s, block_k, warps in _tile_shapes(tile_shape):
                if (block_s, block_k, warps) != (base_s, base_k, base_warps):
                    ensemble("float32", "mean_probs", block_s, block_k, warps)
    specs += _batch_norm_plan(quick)
    return list(dict.fromkeys(specs))  # duplicates (same tile from two S, K) compiled once


def _batch_norm_plan(quick: bool) -> list[Spec]:
    """The fused BatchNorm kernels (kernels/batch_norm.py): every flag combination in float32 at
    the NCHW tile, the load/store paths in bfloat16/float16, and the channels_last tile.
    The tiles are the launcher's (divco.ops.batch_norm.tile_shape): NCHW long along HW,
    channels_last long along C; the finalize kernel takes up to 1024 channels per program (it reads
    x for the pivot: x_ptr has the activations' dtype). Every launch of the elementwise kernels is a
    flat grid, the reductions' (channel tiles, chunks of N·H·W units)."""
    specs: list[Spec] = []
    tiles = ((4, 512), (64, 32)) if not quick else ((4, 512),)
    bools = (False, True)
    for block_c, block_hw in tiles:
        tile = (("BLOCK_C", block_c), ("BLOCK_HW", block_hw))
        for dtype in TRITON_DTYPES:
            every_flag = dtype == "float32" and (block_c, block_hw) == tiles[0]
            pairs = list(itertools.product(bools, bools)) if every_flag else [(False, False), (True, True)]
            for backward, relu in pairs:
                for finalize in bools if every_flag or not backward else (False,):
                    specs.append(Spec("bn_partial_sums_kernel", dtype, (("BACKWARD", backward), ("RELU", relu),
                                                                        ("FINALIZE", finalize)) + tile, 4))
            quads = list(itertools.product(bools, repeat=4)) if every_flag else [(True, True, True, True),
                                                                                 (False, False, False, False)]
            for has_weight, has_bias, has_residual, relu in quads:
                specs.append(Spec("bn_forward_kernel", dtype, (("HAS_WEIGHT", has_weight), ("HAS_BIAS", has_bias),
                                                               ("HAS_RESIDUAL", has_residual), ("RELU", relu)) + tile, 4))
            for training, has_weight, relu, write_residual in quads:
                specs.append(Spec("bn_backward_kernel", dtype, (("TRAINING", training), ("HAS_WEIGHT", has_weight),
                                                                ("RELU", relu), ("WRITE_RESIDUAL", write_residual))
                                  + tile, 4))
    for dtype in TRITON_DTYPES:
        for backward in bools:
            specs.append(Spec("bn_finalize_kernel", dtype, (("BACKWARD", backward), ("BLOCK_C", 1024)), 4))
        # float32 statistics whatever the activations' dtype: the dtype changes nothing here
        for cumulative in bools:
            specs.append(Spec("bn_update_stats_kernel", dtype, (("CUMULATIVE", cumulative), ("BLOCK_C", 1024)), 4))
    return specs


# -- compiling -----------------------------------------------------------------------------------


#: The module of every kernel in the plan (kernels/<op>.py, named after its op).
KERNEL_MODULES = {
    "cotrain_loss_kernel": "divco.kernels.cotrain_loss",
    "ensemble_kernel": "divco.kernels.ensemble",
    "ensemble_backward_kernel": "divco.kernels.ensemble",
    "bn_partial_sums_kernel": "divco.kernels.batch_norm",
    "bn_finalize_kernel": "divco.kernels.batch_norm",
    "bn_forward_kernel": "divco.kernels.batch_norm",
    "bn_backward_kernel": "divco.kernels.batch_norm",
    "bn_update_stats_kernel": "divco.kernels.batch_norm",
}

#: Pointers of the BatchNorm kernels that hold float32 statistics, parameters or sums (the rest
#: hold activations, in the activations' dtype).
BN_FLOAT32_POINTERS = {"running_mean_ptr", "running_var_ptr", "mean_ptr", "var_ptr", "weight_ptr", "bias_ptr", "partial_ptr", "first_ptr", "second_ptr",
                       "sum_dy_ptr", "sum_dy_xhat_ptr"}


def _kernel(name: str):
    """The kernel's JITFunction (never an interpreted one: see the module docstring)."""
    import importlib

    from triton.runtime.jit import JITFunction

    module = KERNEL_MODULES[name]
    fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{module}.{name} is a {type(fn).__name__}, not a JITFunction: "
                           "run this without TRITON_INTERPRET=1")
    return fn


def _pointer_dtype(arg: str, spec: Spec) -> str:
    """The element type of a pointer argument, from its name (the launchers' buffers)."""
    override = dict(spec.pointer_dtypes)
    if arg in override:
        return override[arg]
    logits = TRITON_DTYPES[spec.dtype]
    consts = dict(spec.constexprs)
    if arg == "target_ptr":
        return logits if consts.get("SOFT_TARGET") else "i64"
    if arg == "hits_ptr":
        return "i32"
    if arg in ("weight_ptr", "sample_weight_ptr", "weights_ptr", "ce_rows_ptr", "cot_rows_ptr"):
        return "fp32"
    if arg == "num_batches_ptr":
        return "i64"
    if spec.kernel.startswith("bn_"):
        return "fp32" if arg in BN_FLOAT32_POINTERS else logits
    if arg in ("logits_ptr", "ensemble_ptr", "grad_ptr", "out_ptr", "grad_out_ptr"):
        return logits
    raise KeyError(f"pointer argument {arg!r}: its dtype is not in the compile plan; add it to _pointer_dtype")


def _source(spec: Spec):
    """ASTSource with the types and alignment a launch from the launchers specialises on:
    16-byte aligned pointers (fresh torch allocations), unit class strides (contiguous rows)."""
    from triton.compiler import ASTSource

    fn = _kernel(spec.kernel)
    consts = dict(spec.constexprs)
    declared = [p.name for p in fn.params if p.is_constexpr]
    missing = [n for n in declared if n not in consts]
    if missing:
        raise KeyError(f"{spec.kernel} has constexprs {missing} that the compile plan does not set")
    unit_strides = {n for n in ("stride_k", "target_stride_k") if n in fn.arg_names}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in unit_strides:
            signature[name] = "constexpr"
            consts[name] = 1
        elif name.endswith("_ptr"):
            signature[name] = "*" + _pointer_dtype(name, spec)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return ASTSource(fn, signature, consts, attrs)


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.is_file():
        return str(bundled)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("cuobjdump") or (str(Path(cuda_home) / "bin" / "cuobjdump")
                                         if (Path(cuda_home) / "bin" / "cuobjdump").is_file() else None)


RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """{"n_regs", "local_bytes", "stack_bytes"} of the cubin's (single) kernel, via cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    match = RESOURCE_LINE.search(text)
    if not match:
        return {}
    regs, stack, _, local = map(int, match.groups())
    return {"n_regs": regs, "stack_bytes": stack, "local_bytes": local}


def compile_one(job: tuple[Spec, int]) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    spec, arch = job
    start = time.perf_counter()
    try:
        compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps})
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as error:  # noqa: BLE001 - every failure is reported, with its spec
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        return Result(spec, arch, False, time.perf_counter() - start, error=f"{type(error).__name__}: {first}"[:800])
    local = usage.get("local_bytes")
    return Result(spec, arch, True, time.perf_counter() - start, n_regs=usage.get("n_regs"),
                  n_spills=None if local is None else local // 4, shared=compiled.metadata.shared,
                  extra={"stack_bytes": usage.get("stack_bytes")})


def compile_all(specs: list[Spec], archs: tuple[int, ...], jobs: int) -> list[Result]:
    work = [(spec, arch) for arch in archs for spec in specs]
    if jobs <= 1:
        return [compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, work, chunksize=4))


def format_table(results: list[Result]) -> str:
    lines = [f"{'arch':>6} {'regs':>5} {'spills':>6} {'smem':>6} {'s':>5}  specialisation"]
    for r in results:
        if r.ok:
            lines.append(f"sm_{r.arch:<3} {r.n_regs if r.n_regs is not None else '?':>5} "
                         f"{r.n_spills if r.n_spills is not None else '?':>6} {r.shared:>6} {r.seconds:5.1f}  "
                         f"{r.spec.label()}")
        else:
            lines.append(f"sm_{r.arch:<3} FAILED {r.seconds:5.1f}  {r.spec.label()}: {r.error}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 90], help="compute capabilities")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="dtypes and flags only, no tile-shape sweep")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it", file=sys.stderr)
        return 2
    import triton

    start = time.perf_counter()
    specs = plan(quick=args.quick)
    results = compile_all(specs, tuple(args.arch), args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    spilled = [r for r in results if r.ok and r.n_spills]
    print(f"triton {triton.__version__}: {len(results) - len(failed)}/{len(results)} compiled "
          f"({len(specs)} specialisations x {len(args.arch)} archs) in {time.perf_counter() - start:.0f} s; "
          f"{len(spilled)} spill registers")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "results": [r.as_dict() for r in results]},
                                        indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
