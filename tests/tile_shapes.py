"""Shapes and flags the hypothesis tests draw on a GPU: a small fixed set of tile classes.

On a GPU every distinct (kernel, constexprs, dtypes, integer specialisation) a hypothesis
example reaches is a fresh Triton compile (0.3-2 s each): free random shapes made one test
compile ~230 of them. Under the GPU hypothesis profile (DIVCO_HYPOTHESIS=gpu, what
scripts/gpu_suite.sh selects) the strategies draw every field that changes what Triton
compiles (branches S, classes K, rows N, dtype, memory layout, the flags that become
constexprs) jointly, as one case from the fixed lists below; the values (seeds, scales,
weights, temperatures other than 1) stay random. The universe of specialisations is then
small, known on a CPU (tests/scripts/test_tile_shapes.py counts and bounds it) and compiled
ahead by scripts/warm_triton_cache.py, which runs the same tests sharded by case
(DIVCO_TILE_SHARD=i/n) in parallel processes sharing TRITON_CACHE_DIR.

Elsewhere (the CPU, the Triton interpreter) nothing changes: each helper returns the test's
own strategy.

    S, K = ...                                 # composite strategies
    return tile_shapes.pinned(draw, "cotrain_loss", dict(S=S, K=K, ...))
    @given(N=tile_shapes.field("ensemble", "N", st.integers(1, 12)), ...)   # keyword strategies
"""

from __future__ import annotations

import os
import random

from hypothesis import strategies as st

#: The GPU hypothesis profile (registered in tests/conftest.py).
GPU_PROFILE = os.environ.get("DIVCO_HYPOTHESIS") == "gpu"
#: Hypothesis examples per test under the GPU profile (derandomized).
GPU_MAX_EXAMPLES = 8

#: (S, K): branches x classes, one per distinct launcher tile (divco.ops.triton_backend.tile_shape):
#: one branch (no co-training term), a branch count that is no power of two (masked rows),
#: one tile holding every class, classes walked in tiles.
TILE_CLASSES = ((1, 10), (3, 100), (4, 1000), (2, 40000))
#: Rows: Triton specialises an integer argument on == 1, on divisible by 16, and otherwise.
ROWS = (1, 5, 16)
#: (N, C, H, W) of the BatchNorm cases: odd sizes, a WRN-like block, wide channels, N·H·W = 2.
BATCH_NORM_SHAPES = ((2, 6, 5, 5), (8, 64, 16, 16), (3, 256, 4, 4), (1, 3, 1, 2))
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "branch_major", "class_major", "every_other_class")
ENSEMBLE_MODES = ("mean_logits", "mean_probs", "geo_mean", "max", "max_probs", "vote")
WEIGHTED_MODES = ("mean_logits", "mean_probs", "geo_mean", "vote")
#: Cases per op: at most the warm-up's processes, so that a shard holds one case of each op.
MAX_CASES = 16


def _balanced(rng: random.Random, values, count: int) -> list:
    """``count`` values, each of ``values`` about equally often, in a fixed shuffled order."""
    out = [values[i % len(values)] for i in range(count)]
    rng.shuffle(out)
    return out


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _cotrain_cases() -> list[dict]:
    rng, count = random.Random(1), 12
    columns = dict(
        dtype=_balanced(rng, DTYPES, count), layout=_balanced(rng, LAYOUTS, count),
        target=_balanced(rng, ("hard", "smooth", "mixup", "dense"), count), kind=_balanced(rng, ("js", "kl"), count),
        temperature=_balanced(rng, (1.0, 0.5, 2.0, 3.7), count),
        sample_weight=_balanced(rng, (None, "with_zeros", "positive"), count), N=_balanced(rng, ROWS, count),
    )
    cases = []
    for i in range(count):
        S, K = TILE_CLASSES[i % len(TILE_CLASSES)]
        case = {name: column[i] for name, column in columns.items()}
        case.update(S=S, K=K, N=min(case["N"], max(1, 300_000 // (S * K))), dtype=_torch_dtype(case["dtype"]))
        cases.append(case)
    return cases


def _ensemble_cases() -> list[dict]:
    rng, count = random.Random(2), 12
    columns = dict(dtype=_balanced(rng, DTYPES, count), layout=_balanced(rng, LAYOUTS, count),
                   mode=_balanced(rng, ENSEMBLE_MODES, count), N=_balanced(rng, ROWS, count))
    cases = []
    for i in range(count):
        S, K = TILE_CLASSES[i % len(TILE_CLASSES)]
        case = {name: column[i] for name, column in columns.items()}
        case.update(S=S, K=K, dtype=_torch_dtype(case["dtype"]))
        cases.append(case)
    return cases


def _weighted_ensemble_cases() -> list[dict]:
    rng, count = random.Random(3), 8
    columns = dict(dtype=_balanced(rng, DTYPES, count), mode=_balanced(rng, WEIGHTED_MODES, count),
                   as_tensor=_balanced(rng, (False, True), count), transposed=_balanced(rng, (False, True), count),
                   N=_balanced(rng, ROWS, count))
    weights = (0.0, 3.0, 0.5, 1.0)  # a zero weight among them (from two branches on)
    cases = []
    for i in range(count):
        S, K = TILE_CLASSES[i % len(TILE_CLASSES)]
        case = {name: column[i] for name, column in columns.items()}
        raw = list(weights[:S]) if S > 1 else [1.0]
        case.update(K=K, raw=raw, dtype=_torch_dtype(case["dtype"]))
        cases.append(case)
    return cases


def _batch_norm_cases() -> list[dict]:
    rng, count = random.Random(4), 12
    flags = ("channels_last", "training", "residual", "relu", "affine")
    columns = {flag: _balanced(rng, (False, True), count) for flag in flags}
    columns["dtype"] = _balanced(rng, DTYPES, count)
    cases = []
    for i in range(count):
        N, C, H, W = BATCH_NORM_SHAPES[i % len(BATCH_NORM_SHAPES)]
        case = {name: column[i] for name, column in columns.items()}
        case.update(N=N, C=C, H=H, W=W, dtype=_torch_dtype(case["dtype"]))
        cases.append(case)
    return cases


#: Every op's fixed cases (the fields that change what Triton compiles), in a fixed order.
CASES: dict[str, list[dict]] = {
    "cotrain_loss": _cotrain_cases(),
    "ensemble": _ensemble_cases(),
    "weighted_ensemble": _weighted_ensemble_cases(),
    "batch_norm": _batch_norm_cases(),
}
assert all(len(cases) <= MAX_CASES for cases in CASES.values())


def shard(cases: list, spec: str | None) -> list:
    """The cases of shard ``i/n`` (DIVCO_TILE_SHARD): every n-th from the i-th; where an op has
    fewer than n cases, shard i takes case i mod len (never none)."""
    if not spec:
        return cases
    i, n = (int(part) for part in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"DIVCO_TILE_SHARD must be i/n with 0 <= i < n, got {spec!r}")
    if len(cases) >= n:
        return cases[i::n]
    return [cases[i % len(cases)]]


def cases_for(op: str) -> list[dict]:
    """The cases a test of ``op`` draws from here (its shard in a warm-up process)."""
    return shard(CASES[op], os.environ.get("DIVCO_TILE_SHARD"))


def _case(op: str):
    # shared: every field of one example comes from the same case
    return st.shared(st.sampled_from(cases_for(op)), key=f"divco-tile-case-{op}")


def field(op: str, name: str, default):
    """``default`` (a strategy), or under the GPU profile the field ``name`` of the example's case."""
    if not GPU_PROFILE:
        return default
    return _case(op).map(lambda case: case[name])


def pinned(draw, op: str, drawn: dict) -> dict:
    """``drawn`` (a composite strategy's draws), with the fields of a fixed case under the GPU profile."""
    if not GPU_PROFILE:
        return drawn
    return {**drawn, **draw(_case(op))}


def examples(count: int) -> int:
    """A test's hypothesis example count: ``count``, capped under the GPU profile."""
    return min(count, GPU_MAX_EXAMPLES) if GPU_PROFILE else count


# -- the specialisations the cases compile (counted on a CPU) ------------------------------------


def _argument_class(value):
    """How Triton specialises one launch argument: a tensor by dtype and 16-byte alignment, an
    integer by == 1 / divisible by 16 / 64-bit, a float by its type; constexprs by value."""
    import torch

    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return "1" if value == 1 else "i64" if abs(value) >= 2**31 else "D" if value % 16 == 0 else "i32"
    return type(value).__name__


class _Recorder:
    """Stands in for wrap_triton: records each launch's specialisation key, launches nothing."""

    def __init__(self, keys: set):
        self.keys = keys

    def __call__(self, kernel):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))

        def launch(*args, **constexprs):
            self.keys.add((name, tuple(_argument_class(a) for a in args), tuple(sorted(constexprs.items()))))

        return _Grid(launch)


class _Grid:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


def _logits(N, S, K, dtype, layout):
    """Empty [N, S, K] logits in one of test_backends.make_logits's layouts (the strides matter)."""
    import torch

    if layout == "branch_major":
        return torch.empty(S, N, K, dtype=dtype).transpose(0, 1)
    if layout == "class_major":
        return torch.empty(N, K, S, dtype=dtype).transpose(1, 2)
    if layout == "every_other_class":
        return torch.empty(N, S, 2 * K, dtype=dtype)[..., ::2]
    return torch.empty(N, S, K, dtype=dtype)


def _launch_case(op: str, case: dict) -> None:
    """Call the Triton launchers the way ``op``'s hypothesis test does for ``case`` (CPU tensors)."""
    import importlib

    import torch

    f32 = torch.float32
    if op == "cotrain_loss":
        ops = importlib.import_module("divco.ops.cotrain_loss")
        N, S, K = case["N"], case["S"], case["K"]
        logits = _logits(N, S, K, case["dtype"], case["layout"])
        target = torch.zeros(N, dtype=torch.int64) if case["target"] == "hard" else torch.zeros(N, K)
        sample_weight = None if case["sample_weight"] is None else torch.ones(N, dtype=f32)
        ops.cotrain_loss_triton(logits, target, torch.zeros((), dtype=f32), sample_weight, case["kind"],
                                case["temperature"], True)
    elif op in ("ensemble", "weighted_ensemble"):
        ops = importlib.import_module("divco.ops.ensemble")
        weighted = op == "weighted_ensemble"
        S = len(case["raw"]) if weighted else case["S"]
        N = min(case["N"], 2) if case["K"] > 64 else case["N"]  # as the tests cap it
        layout = ("branch_major" if case["transposed"] else "contiguous") if weighted else case["layout"]
        logits = _logits(N, S, case["K"], case["dtype"], layout)
        weights = torch.ones(S, dtype=f32) if weighted else None
        ops.ensemble_triton(logits, case["mode"], weights)
        ops.ensemble_backward_triton(torch.empty(N, case["K"], dtype=case["dtype"]), logits, case["mode"], weights)
    elif op == "batch_norm":
        ops = importlib.import_module("divco.ops.batch_norm")
        N, C, H, W = case["N"], case["C"], case["H"], case["W"]
        if case["training"] and N * H * W == 1:
            W = 2
        fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
        x = torch.empty(N, C, H, W, dtype=case["dtype"]).contiguous(memory_format=fmt)
        w = torch.ones(C) if case["affine"] else None
        stats = torch.zeros(C), torch.ones(C)
        residual = torch.empty_like(x) if case["residual"] else None
        out, mean, var = ops.batch_norm_triton_impl(x, w, w, *stats, residual, case["training"], 1e-5, case["relu"])
        if case["training"]:  # the running-statistics update that follows every training forward
            ops.batch_norm_update_stats_triton_impl(stats[0].clone(), stats[1].clone(), mean, var, None, 0.1,
                                                    N * H * W)
        else:
            mean, var = stats
        ops.batch_norm_backward_triton_impl(torch.empty_like(x), x, out, w, mean, var, case["training"], 1e-5,
                                            case["relu"], case["residual"])
    else:
        raise KeyError(op)


def specialisations(ops=None) -> set[tuple]:
    """Every Triton specialisation key the GPU-profile cases of ``ops`` (default: all) launch:
    (kernel, argument classes, constexprs), from the launchers themselves (divco.ops.*) with
    wrap_triton replaced by a recorder. Needs the launchers importable (Triton installed)."""
    import importlib

    from divco.ops import triton_backend

    if triton_backend.TRITON_ERROR:
        raise RuntimeError(f"Triton is not importable: {triton_backend.TRITON_ERROR}")
    bn = importlib.import_module("divco.ops.batch_norm")
    keys: set = set()
    saved = triton_backend.wrap_triton, bn.wrap_triton
    triton_backend.wrap_triton = bn.wrap_triton = _Recorder(keys)
    try:
        for op in ops or CASES:
            for case in CASES[op]:
                _launch_case(op, case)
    finally:
        triton_backend.wrap_triton, bn.wrap_triton = saved
    return keys


def kernel_constexpr_dtype(key: tuple) -> tuple:
    """(kernel, constexprs, tensor dtypes) of a specialisation key: the Triton compile without
    the integer and alignment classes."""
    kernel, arguments, constexprs = key
    return kernel, constexprs, tuple(a[0] for a in arguments if isinstance(a, tuple))


if __name__ == "__main__":
    # python tests/tile_shapes.py: what the GPU profile compiles (scripts/gpu_suite.sh --dry-run prints it)
    keys = specialisations()
    per_kernel: dict[str, int] = {}
    for key in keys:
        per_kernel[key[0]] = per_kernel.get(key[0], 0) + 1
    print(f"GPU hypothesis profile: {sum(map(len, CASES.values()))} cases "
          f"({', '.join(f'{op} {len(c)}' for op, c in CASES.items())}), at most {GPU_MAX_EXAMPLES} examples a test; "
          f"{len(keys)} Triton specialisations ({len({kernel_constexpr_dtype(k) for k in keys})} "
          f"distinct kernel x constexprs x dtypes): " + ", ".join(f"{k} {n}" for k, n in sorted(per_kernel.items())))
