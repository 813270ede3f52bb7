"""The GPU hypothesis profile (tests/tile_shapes.py) on a CPU: the Triton specialisations its
fixed cases compile are few and bounded, the strategies draw only those cases (every field of
an example from one case), the warm-up's shards cover every case, and tests/conftest.py marks
Triton and Inductor tests so that the GPU suite can select them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tile_shapes
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.ops import triton_backend

REPO = Path(__file__).resolve().parents[2]
#: The specialisations the GPU profile may compile (each 0.3-2 s on a cold cache; the warm-up
#: compiles them on 16 cores in its 40 s). Free random shapes compiled ~230 in one test alone.
MAX_SPECIALISATIONS = 128
#: Every Triton kernel divco launches (scripts/triton_compile_report.py's KERNEL_MODULES).
KERNELS = {"cotrain_loss_kernel", "ensemble_kernel", "ensemble_backward_kernel", "bn_partial_sums_kernel",
           "bn_finalize_kernel", "bn_forward_kernel", "bn_backward_kernel", "bn_update_stats_kernel"}

needs_triton = pytest.mark.skipif(bool(triton_backend.TRITON_ERROR), reason="Triton is not importable")


@needs_triton
def test_the_gpu_profile_compiles_few_specialisations_of_every_kernel():
    keys = tile_shapes.specialisations()
    assert {key[0] for key in keys} == KERNELS, "every kernel is exercised by the GPU profile's cases"
    assert len(keys) <= MAX_SPECIALISATIONS, f"{len(keys)} Triton specialisations > {MAX_SPECIALISATIONS}"
    distinct = {tile_shapes.kernel_constexpr_dtype(key) for key in keys}
    assert len(distinct) <= len(keys)
    # every dtype and both tiling regimes of the loss kernel are among them
    cotrain = [dict(key[2]) for key in keys if key[0] == "cotrain_loss_kernel"]
    assert {c["SINGLE_TILE"] for c in cotrain} == {False, True}
    dtypes = {d for kernel, _, ds in distinct for d in ds}
    assert {"float32", "bfloat16", "float16"} <= dtypes


@needs_triton
def test_the_count_sees_what_changes_a_compile(monkeypatch):
    """The recorder tells apart what Triton specialises on: strides, a row count of 1, a dtype, a flag."""
    import torch

    case = dict(tile_shapes.CASES["cotrain_loss"][1], layout="contiguous", N=5, dtype=torch.float32)
    changes = {"base": {}, "strided": dict(layout="every_other_class"), "one row": dict(N=1),
               "dtype": dict(dtype=torch.float16), "kind": dict(kind="kl" if case["kind"] == "js" else "js")}
    keys = {}
    for name, change in changes.items():
        monkeypatch.setitem(tile_shapes.CASES, "cotrain_loss", [dict(case, **change)])
        keys[name] = frozenset(tile_shapes.specialisations(["cotrain_loss"]))
        assert len(keys[name]) == 1
    assert len(set(keys.values())) == len(changes), keys


def test_the_cases_are_few_and_cover_each_field():
    for op, cases in tile_shapes.CASES.items():
        assert 0 < len(cases) <= tile_shapes.MAX_CASES, op
    cotrain = tile_shapes.CASES["cotrain_loss"]
    assert {(c["S"], c["K"]) for c in cotrain} == set(tile_shapes.TILE_CLASSES)
    for field in ("layout", "target", "kind", "temperature", "sample_weight"):
        assert len({c[field] for c in cotrain}) > 1, field
    assert {c["mode"] for c in tile_shapes.CASES["ensemble"]} == set(tile_shapes.ENSEMBLE_MODES)
    for flag in ("channels_last", "training", "residual", "relu", "affine"):
        assert {c[flag] for c in tile_shapes.CASES["batch_norm"]} == {False, True}, flag


@pytest.mark.parametrize("jobs", [1, 3, 12, 16])
def test_the_warm_up_shards_cover_every_case(jobs):
    for cases in tile_shapes.CASES.values():
        shards = [tile_shapes.shard(list(range(len(cases))), f"{i}/{jobs}") for i in range(jobs)]
        assert all(shards), "no shard is empty"
        assert sorted({c for s in shards for c in s}) == list(range(len(cases)))
        assert max(map(len, shards)) <= -(-len(cases) // jobs)
    with pytest.raises(ValueError, match="i/n"):
        tile_shapes.shard([1, 2], "3/2")


def test_off_the_gpu_profile_the_strategies_are_the_tests_own(monkeypatch):
    monkeypatch.setattr(tile_shapes, "GPU_PROFILE", False)
    own = st.integers(1, 3)
    assert tile_shapes.field("ensemble", "N", own) is own
    assert tile_shapes.examples(60) == 60


def test_the_gpu_profile_draws_whole_cases(monkeypatch):
    monkeypatch.setattr(tile_shapes, "GPU_PROFILE", True)
    assert tile_shapes.examples(60) == tile_shapes.GPU_MAX_EXAMPLES
    cases = tile_shapes.CASES["ensemble"]
    drawn = []

    @settings(max_examples=30, database=None)
    @given(N=tile_shapes.field("ensemble", "N", st.integers(1, 1000)),
           K=tile_shapes.field("ensemble", "K", st.integers(1, 10**6)),
           mode=tile_shapes.field("ensemble", "mode", st.just("nonsense")))
    def check(N, K, mode):
        drawn.append((N, K, mode))
        assert any((c["N"], c["K"], c["mode"]) == (N, K, mode) for c in cases), "the fields of one case"

    check()
    assert len(set(drawn)) > 1


def _collect(*args: str) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    listing = Path(os.environ.get("TMPDIR", "/tmp")) / f"divco-collect-{os.getpid()}.tsv"
    env["DIVCO_SUITE_COLLECT"] = str(listing)
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        return [line.split("\t") for line in listing.read_text().splitlines()]
    finally:
        listing.unlink()


@pytest.mark.slow
def test_triton_and_inductor_tests_are_marked_and_counted_as_gpu_tests():
    rows = _collect("-m", "gpu or triton", "tests/ops/test_public_api.py")
    by_id = {row[0]: row[1:] for row in rows}
    triton = [nodeid for nodeid, (gpu, is_triton, _) in by_id.items() if is_triton == "1"]
    assert triton and all("triton" in nodeid for nodeid in triton)
    assert by_id["tests/ops/test_public_api.py::test_compiles_without_graph_breaks[triton-inductor]"][1:] == ["1", "1"]
    assert by_id["tests/ops/test_public_api.py::test_compiles_without_graph_breaks[triton-aot_eager]"][1:] == ["1", "0"]
    assert by_id["tests/ops/test_public_api.py::test_compiles_on_gpu_and_captures_in_a_cuda_graph[cuda]"] == \
        ["1", "0", "1"]  # mode="reduce-overhead": Inductor
    assert not any(nodeid.endswith(("[torch]", "[cpu]")) for nodeid in by_id), "CPU backends are no GPU tests"


@pytest.mark.slow
def test_a_warm_up_shard_runs_every_hypothesis_test_and_its_share_of_the_rest(monkeypatch):
    monkeypatch.setenv("DIVCO_TILE_SHARD", "1/4")
    shard = {row[0] for row in _collect("-m", "triton", "tests/ops/test_backends.py")}
    monkeypatch.delenv("DIVCO_TILE_SHARD")
    every = {row[0] for row in _collect("-m", "triton", "tests/ops/test_backends.py")}
    hypothesis_tests = {"tests/ops/test_backends.py::test_cotrain_loss_matches_reference[triton]",
                        "tests/ops/test_backends.py::test_ensemble_matches_reference[triton]"}
    assert hypothesis_tests <= shard < every
    assert len(shard - hypothesis_tests) <= -(-len(every) // 4)
